"""Fewer writes per append.

Every append writes one entry in each index of the store and of the outbox,
and the outbox's foreign key to the store was checked at commit (a query and
a row lock on the stored event, per outbox row). Here:

- event_type and correlation_id keep one plain btree each. `db_index` on a
  CharField had added a second, `varchar_pattern_ops` index for LIKE, which
  no query uses (lookups are equality or `= ANY`).
- The outbox's reference to its event keeps no constraint and no index: the
  append inserts it from the positions its own INSERT returned, stored events
  are never deleted (migration 0002's trigger), and nothing looks outbox rows
  up by event.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("eventing", "0005_outbox_fillfactor"),
    ]

    operations = [
        migrations.AlterField(
            model_name="outboxmessage",
            name="event",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="eventing.storedevent",
            ),
        ),
        migrations.AlterField(
            model_name="storedevent",
            name="correlation_id",
            field=models.CharField(max_length=64),
        ),
        migrations.AlterField(
            model_name="storedevent",
            name="event_type",
            field=models.CharField(max_length=150),
        ),
        migrations.AddIndex(
            model_name="storedevent",
            index=models.Index(fields=["event_type"], name="event_type"),
        ),
        migrations.AddIndex(
            model_name="storedevent",
            index=models.Index(fields=["correlation_id"], name="event_correlation"),
        ),
    ]
