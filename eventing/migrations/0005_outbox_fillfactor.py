"""Leave room on the outbox's pages for the relay's lease update.

The relay leases each row it claims (UPDATE claimed_until, attempts) and
deletes it once the broker confirmed it. Neither column is indexed, so with
free space on the row's page PostgreSQL makes the lease a heap-only (HOT)
update: no new entry in any of the outbox's three indexes. Freshly inserted
rows fill pages to 100% by default, which left no room and made every lease
write three index entries. At 30% a page has room for every row's leased
version (which is larger: claimed_until goes from NULL to a timestamp); the
outbox is a queue, so the extra space is bounded by the backlog.
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("eventing", "0004_consumer_lag_sample")]

    operations = [
        migrations.RunSQL(
            "ALTER TABLE eventing_outboxmessage SET (fillfactor = 30)",
            reverse_sql="ALTER TABLE eventing_outboxmessage RESET (fillfactor)",
        )
    ]
