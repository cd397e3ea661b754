"""The PostgreSQL schema and its migrations (docs/STORE.md, "PostgreSQL").

The tables and columns are SQLite schema 3's, so one set of SQL statements and one set of row
converters (``sqlite_schema``) serve both engines: timestamps are ISO 8601 UTC text with
microseconds (they sort as text, as on SQLite), sealed values ``BYTEA``. Every text column
compares bytewise (``COLLATE "C"``) so listings page in the same order as SQLite's.

Added for several nodes: ``generation`` (one row, bumped by every write transaction; what the
caches of every node compare against), ``counters`` (the customer-key quota as a locked
counter), ``nodes`` (each serving process's lease and the generation it has applied), and
``scheduler_lease`` (which node runs the scheduler, until when, and the fencing token), and
``audit_records``, the append-only copy of every node's audit chains (``audit/pgmirror.py``).

``SCHEMA_VERSION`` is what a database is migrated to on open; ``MIGRATIONS[n]`` takes it from
n to n + 1 inside one transaction.
"""

from __future__ import annotations

SCHEMA_VERSION = 2

# The bytewise-compared text type of every text column.
_T = 'TEXT COLLATE "C"'

SCHEMA_V1 = f"""
CREATE TABLE meta (
    name  {_T} PRIMARY KEY,
    value {_T} NOT NULL
);
CREATE TABLE keys (
    key_id               {_T} PRIMARY KEY,
    arn                  {_T} NOT NULL UNIQUE,
    account_id           {_T} NOT NULL,
    region               {_T} NOT NULL,
    description          {_T} NOT NULL,
    state                {_T} NOT NULL,
    origin               {_T} NOT NULL,
    key_manager          {_T} NOT NULL,
    key_usage            {_T} NOT NULL,
    key_spec             {_T} NOT NULL,
    creation_date        {_T} NOT NULL,
    deletion_date        {_T},
    valid_to             {_T},
    policy               {_T},
    tags                 {_T} NOT NULL DEFAULT '[]',
    rotation_enabled     INTEGER NOT NULL DEFAULT 0,
    rotation_period_days INTEGER,
    next_rotation_date   {_T},
    expiration_model     {_T},
    material_id          {_T}
);
CREATE INDEX keys_by_next_rotation ON keys(next_rotation_date) WHERE rotation_enabled = 1;
CREATE INDEX keys_by_deletion_date ON keys(deletion_date) WHERE deletion_date IS NOT NULL;
CREATE TABLE key_versions (
    key_id          {_T} NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    version         INTEGER NOT NULL,
    creation_date   {_T} NOT NULL,
    sealed_material BYTEA NOT NULL,
    rotation_type   {_T},
    PRIMARY KEY (key_id, version)
);
CREATE TABLE import_parameters (
    token_id           {_T} PRIMARY KEY,
    key_id             {_T} NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    wrapping_algorithm {_T} NOT NULL,
    wrapping_key_spec  {_T} NOT NULL,
    sealed_private_key BYTEA NOT NULL,
    creation_date      {_T} NOT NULL,
    valid_to           {_T} NOT NULL
);
CREATE INDEX import_parameters_by_key ON import_parameters(key_id);
CREATE TABLE aliases (
    name              {_T} PRIMARY KEY,
    target_key_id     {_T} NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    creation_date     {_T} NOT NULL,
    last_updated_date {_T} NOT NULL
);
CREATE INDEX aliases_by_target ON aliases(target_key_id);
CREATE TABLE credentials (
    access_key_id {_T} PRIMARY KEY,
    principal_arn {_T} NOT NULL,
    account_id    {_T} NOT NULL,
    sealed_secret BYTEA NOT NULL,
    creation_date {_T} NOT NULL,
    enabled       INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX credentials_by_principal ON credentials(principal_arn);
CREATE TABLE principals (
    arn           {_T} PRIMARY KEY,
    name          {_T} NOT NULL UNIQUE,
    account_id    {_T} NOT NULL,
    creation_date {_T} NOT NULL
);
CREATE TABLE identity_policies (
    principal_arn {_T} NOT NULL REFERENCES principals(arn) ON DELETE CASCADE,
    name          {_T} NOT NULL,
    document      {_T} NOT NULL,
    PRIMARY KEY (principal_arn, name)
);
CREATE TABLE grants (
    grant_id           {_T} PRIMARY KEY,
    key_id             {_T} NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    grantee            {_T} NOT NULL,
    retiring_principal {_T},
    operations         {_T} NOT NULL,
    constraints        {_T},
    name               {_T},
    issuing_account    {_T} NOT NULL,
    creation_date      {_T} NOT NULL
);
CREATE INDEX grants_by_key ON grants(key_id, grantee);
CREATE INDEX grants_by_retiring_principal ON grants(retiring_principal);
CREATE TABLE generation (
    one   BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    value BIGINT NOT NULL
);
INSERT INTO generation(one, value) VALUES (TRUE, 0);
CREATE TABLE counters (
    name  {_T} PRIMARY KEY,
    value BIGINT NOT NULL CHECK (value >= 0)
);
INSERT INTO counters(name, value) VALUES ('customer_keys', 0);
CREATE TABLE nodes (
    node_id            {_T} PRIMARY KEY,
    label              {_T} NOT NULL,
    applied_generation BIGINT NOT NULL,
    started            TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_until        TIMESTAMPTZ NOT NULL
);
CREATE TABLE scheduler_lease (
    one         BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    holder      {_T},
    fence       BIGINT NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL
);
INSERT INTO scheduler_lease(one, holder, fence, lease_until) VALUES (TRUE, NULL, 0, '-infinity');
CREATE TABLE audit_records (
    chain_id {_T} NOT NULL,
    seq      BIGINT NOT NULL CHECK (seq >= 1),
    line     BYTEA NOT NULL,
    written  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, seq)
);
CREATE FUNCTION audit_records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_records is append-only: % refused', TG_OP;
END
$$;
CREATE TRIGGER audit_records_no_update_delete BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION audit_records_append_only();
CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION audit_records_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON audit_records FROM PUBLIC;
"""

# Version 2: the audit questions' columns on audit_records (docs/AUDIT.md, "PostgreSQL"), filled
# by the writer at insert (audit/pgmirror.py: ``audit_columns``) and, for the rows already there,
# from their lines by this migration. ``outcome`` is 'success' or 'error' on request records,
# NULL on checkpoints and intents, 'unindexed' on a line that is not a JSON object.
AUDIT_COLUMNS = (
    "t", "operation", "outcome", "principal", "access_key_id", "key_id", "key_version", "path",
    "local_user", "uid", "process", "file_id", "request_id",
)
_AUDIT_JSON = """
CREATE FUNCTION audit_line_jsonb(line BYTEA) RETURNS JSONB LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    -- jsonb cannot hold U+0000: a record naming it is indexed with U+FFFD there (the line keeps it)
    RETURN replace(convert_from(line, 'UTF8'), '\\u0000', '\\ufffd')::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$"""
_AUDIT_BACKFILL = """
UPDATE audit_records a SET
    outcome = CASE WHEN j IS NULL OR jsonb_typeof(j) <> 'object' THEN 'unindexed'
                   WHEN j->>'outcome' IN ('success', 'error') AND j->>'type' IS NULL THEN j->>'outcome' END,
    t = CASE WHEN j->>'time' ~ '^\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d(\\.\\d+)?Z$'
             THEN (j->>'time')::timestamptz END,
    operation = j->>'operation', principal = j->>'principal', access_key_id = j->>'access_key_id',
    key_id = j->>'key_id',
    key_version = CASE WHEN j->>'key_version' ~ '^-?\\d{1,18}$' THEN (j->>'key_version')::bigint END,
    path = CASE WHEN jsonb_typeof(j->'caller'->'path') = 'string' THEN j->'caller'->>'path' END,
    local_user = j->'caller'->>'user',
    uid = CASE WHEN j->'caller'->>'uid' ~ '^-?\\d{1,18}$' THEN (j->'caller'->>'uid')::bigint END,
    process = j->'caller'->>'process',
    file_id = CASE WHEN jsonb_typeof(j->'encryption_context'->'kmsfs:file-id') = 'string'
                   THEN j->'encryption_context'->>'kmsfs:file-id' END,
    request_id = j->>'request_id'
FROM (SELECT chain_id, seq, audit_line_jsonb(line) AS j FROM audit_records) s
WHERE a.chain_id = s.chain_id AND a.seq = s.seq"""
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        f"""ALTER TABLE audit_records
            ADD COLUMN t TIMESTAMPTZ, ADD COLUMN operation {_T}, ADD COLUMN outcome {_T},
            ADD COLUMN principal {_T}, ADD COLUMN access_key_id {_T}, ADD COLUMN key_id {_T},
            ADD COLUMN key_version BIGINT, ADD COLUMN path {_T}, ADD COLUMN local_user {_T},
            ADD COLUMN uid BIGINT, ADD COLUMN process {_T}, ADD COLUMN file_id {_T},
            ADD COLUMN request_id {_T}""",
        _AUDIT_JSON,
        # The rows already there: the append-only trigger is set aside for this one UPDATE, in
        # the migration's transaction (which only the schema's owner can run).
        "ALTER TABLE audit_records DISABLE TRIGGER audit_records_no_update_delete",
        _AUDIT_BACKFILL,
        "ALTER TABLE audit_records ENABLE TRIGGER audit_records_no_update_delete",
        "CREATE INDEX audit_records_t ON audit_records (t) WHERE outcome IN ('success', 'error')",
        "CREATE INDEX audit_records_error ON audit_records (t) WHERE outcome = 'error'",
        "CREATE INDEX audit_records_path ON audit_records (path) WHERE path IS NOT NULL",
        "CREATE INDEX audit_records_user ON audit_records (local_user, t) WHERE local_user IS NOT NULL",
        "CREATE INDEX audit_records_uid ON audit_records (uid, t) WHERE uid IS NOT NULL",
        "CREATE INDEX audit_records_key ON audit_records (key_id, t) WHERE key_id IS NOT NULL",
        "CREATE INDEX audit_records_principal ON audit_records (principal, t) WHERE principal IS NOT NULL",
        "CREATE INDEX audit_records_akid ON audit_records (access_key_id, t) WHERE access_key_id IS NOT NULL",
        "CREATE INDEX audit_records_operation ON audit_records (lower(operation), t)",
        "CREATE INDEX audit_records_file_id ON audit_records (file_id) WHERE file_id IS NOT NULL",
        "CREATE INDEX audit_records_unindexed ON audit_records (chain_id, seq) WHERE outcome = 'unindexed'",
        # Retention (``keyservice audit prune``): the signed prune record of a chain's oldest lines
        # first, insert-only; only then may the rows it covers be deleted, and no others.
        f"""CREATE TABLE audit_prunes (
            chain_id    {_T} NOT NULL,
            through_seq BIGINT NOT NULL CHECK (through_seq >= 1),
            record      BYTEA NOT NULL,
            written     TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (chain_id, through_seq)
        )""",
        """CREATE OR REPLACE FUNCTION audit_records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_records' AND EXISTS (
            SELECT 1 FROM audit_prunes p WHERE p.chain_id = OLD.chain_id AND p.through_seq >= OLD.seq) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
END
$$""",
        "CREATE TRIGGER audit_prunes_no_update_delete BEFORE UPDATE OR DELETE ON audit_prunes "
        "FOR EACH ROW EXECUTE FUNCTION audit_records_append_only()",
        "CREATE TRIGGER audit_prunes_no_truncate BEFORE TRUNCATE ON audit_prunes "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_records_append_only()",
        "REVOKE UPDATE, DELETE, TRUNCATE ON audit_prunes FROM PUBLIC",
    ),
}
