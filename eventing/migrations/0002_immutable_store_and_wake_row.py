from django.db import migrations

# The event store is append-only in the database itself: any UPDATE or DELETE
# on a stored event raises, whoever issues it. TRUNCATE (used by test
# teardown) is a separate statement and is not blocked.
IMMUTABLE_SQL = """
CREATE OR REPLACE FUNCTION eventing_refuse_event_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'eventing_storedevent is append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER eventing_storedevent_immutable
BEFORE UPDATE OR DELETE ON eventing_storedevent
FOR EACH ROW EXECUTE FUNCTION eventing_refuse_event_change();

INSERT INTO eventing_relaywake (id, requested) VALUES (1, false) ON CONFLICT DO NOTHING;
"""

REVERSE_SQL = """
DROP TRIGGER IF EXISTS eventing_storedevent_immutable ON eventing_storedevent;
DROP FUNCTION IF EXISTS eventing_refuse_event_change();
"""


class Migration(migrations.Migration):
    dependencies = [("eventing", "0001_initial")]

    operations = [migrations.RunSQL(IMMUTABLE_SQL, REVERSE_SQL)]
