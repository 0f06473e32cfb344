from eventing.consumers import consumer_task

handle_event = consumer_task("inventory")
