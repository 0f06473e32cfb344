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

On a populated store this must not lock out writers: nothing is rebuilt.
The two btrees that stay are renamed (their content is the same), the
LIKE twins and the outbox index are dropped CONCURRENTLY (so the migration
is not atomic, one statement per operation), and dropping the constraint
takes its locks only for the moment the catalog changes.
"""

import django.db.models.deletion
from django.db import migrations, models


STORE = "eventing_storedevent"
OUTBOX = "eventing_outboxmessage"
FOREIGN_KEY = "eventing_outboxmessa_event_id_016cd514_fk_eventing_"


def _sql(forward: str, reverse: str) -> migrations.RunSQL:
    return migrations.RunSQL(forward, reverse_sql=reverse)


class Migration(migrations.Migration):
    # DROP/CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [
        ("eventing", "0005_outbox_fillfactor"),
    ]

    database_operations = [
        _sql(
            f"ALTER TABLE {OUTBOX} DROP CONSTRAINT IF EXISTS {FOREIGN_KEY}",
            f"ALTER TABLE {OUTBOX} ADD CONSTRAINT {FOREIGN_KEY} FOREIGN KEY (event_id) "
            f"REFERENCES {STORE} (position) DEFERRABLE INITIALLY DEFERRED NOT VALID",
        ),
        _sql(
            "DROP INDEX CONCURRENTLY IF EXISTS eventing_outboxmessage_event_id_016cd514",
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS eventing_outboxmessage_event_id_016cd514 "
            f"ON {OUTBOX} (event_id)",
        ),
        _sql(
            "DROP INDEX CONCURRENTLY IF EXISTS eventing_storedevent_event_type_6da35faa_like",
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS "
            f"eventing_storedevent_event_type_6da35faa_like ON {STORE} "
            "(event_type varchar_pattern_ops)",
        ),
        _sql(
            "DROP INDEX CONCURRENTLY IF EXISTS eventing_storedevent_correlation_id_07cc6380_like",
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS "
            f"eventing_storedevent_correlation_id_07cc6380_like ON {STORE} "
            "(correlation_id varchar_pattern_ops)",
        ),
        _sql(
            "ALTER INDEX IF EXISTS eventing_storedevent_event_type_6da35faa "
            "RENAME TO stored_event_type",
            "ALTER INDEX IF EXISTS stored_event_type "
            "RENAME TO eventing_storedevent_event_type_6da35faa",
        ),
        _sql(
            "ALTER INDEX IF EXISTS eventing_storedevent_correlation_id_07cc6380 "
            "RENAME TO stored_event_correlation",
            "ALTER INDEX IF EXISTS stored_event_correlation "
            "RENAME TO eventing_storedevent_correlation_id_07cc6380",
        ),
    ]

    state_operations = [
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
            index=models.Index(fields=["event_type"], name="stored_event_type"),
        ),
        migrations.AddIndex(
            model_name="storedevent",
            index=models.Index(fields=["correlation_id"], name="stored_event_correlation"),
        ),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=database_operations, state_operations=state_operations
        )
    ]
