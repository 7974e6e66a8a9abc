-- awkward: a schema and data that a logical backup tool finds hard to get right.
--
-- Load with: psql -X -v ON_ERROR_STOP=1 -f awkward.sql DB   (into an empty database)
-- It creates the cluster-global roles fpv_reader and fpv_owner if they do not exist.
-- Deterministic apart from a few now() defaults; it loads in a few seconds.

\set ON_ERROR_STOP on
SET client_min_messages = warning;
SET standard_conforming_strings = on;
SET TimeZone = 'UTC';

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fpv_reader') THEN
    CREATE ROLE fpv_reader NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fpv_owner') THEN
    CREATE ROLE fpv_owner NOLOGIN;
  END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- Types: an enum, a domain, a composite
-- ---------------------------------------------------------------------------
CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy', 'it''s "complicated"');
CREATE DOMAIN public.posint AS integer CHECK (VALUE > 0);
CREATE TYPE public.pair AS (label text, amount numeric);
COMMENT ON TYPE public.pair IS 'a label and an amount';

CREATE FUNCTION public.add_tax(numeric) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$ SELECT $1 * 1.2 $$;
COMMENT ON FUNCTION public.add_tax(numeric) IS 'adds 20% tax';

-- ---------------------------------------------------------------------------
-- Every common column type, with awkward values
-- ---------------------------------------------------------------------------
CREATE TABLE public.all_types (
    id          integer PRIMARY KEY,
    c_int2      int2,
    c_int4      int4,
    c_int8      int8,
    c_numeric   numeric,
    c_num_s     numeric(20, 6),
    c_real      real,
    c_double    double precision,
    c_bool      boolean,
    c_text      text,
    c_varchar   varchar(40),
    c_char      char(5),
    c_bytea     bytea,
    c_date      date,
    c_time      time,
    c_timetz    timetz,
    c_ts        timestamp,
    c_tstz      timestamptz,
    c_interval  interval,
    c_uuid      uuid,
    c_json      json,
    c_jsonb     jsonb,
    c_int_arr   integer[],
    c_text_arr  text[],
    c_2d_arr    integer[][],
    c_inet      inet,
    c_cidr      cidr,
    c_macaddr   macaddr,
    c_money     money,
    c_bit       bit(8),
    c_varbit    bit varying,
    c_tsvector  tsvector,
    c_point     point,
    c_box       box,
    c_int4range int4range,
    c_numrange  numrange,
    c_tstzrange tstzrange,
    c_daterange daterange,
    c_mood      public.mood,
    c_posint    public.posint,
    c_pair      public.pair,
    c_pair_arr  public.pair[],
    CONSTRAINT all_types_tax_ok CHECK (public.add_tax(coalesce(c_numeric, 0)) IS NOT NULL OR c_numeric = 'NaN')
);
COMMENT ON TABLE public.all_types IS 'every common type; it''s awkward';
COMMENT ON COLUMN public.all_types.c_text IS E'text with\ttabs and "quotes"';

-- 1: all NULL
INSERT INTO public.all_types (id) VALUES (1);

-- 2: empty values
INSERT INTO public.all_types (id, c_text, c_varchar, c_char, c_bytea, c_json, c_jsonb, c_int_arr,
                              c_text_arr, c_varbit, c_tsvector, c_int4range, c_pair, c_pair_arr)
VALUES (2, '', '', '', '\x', '""', '{}', '{}', '{}', B'', '', 'empty', ROW('', NULL), '{}');

-- 3: the literal text \N (COPY's NULL marker) everywhere text goes
INSERT INTO public.all_types (id, c_text, c_varchar, c_char, c_bytea, c_json, c_jsonb, c_text_arr,
                              c_pair, c_pair_arr)
VALUES (3, '\N', '\N', '\N', convert_to('\N', 'UTF8'), '"\\N"', '{"\\N": "\\N"}',
        ARRAY['\N', NULL, 'NULL', '', 'a,b', 'with "quote"', '{brace}', ' spaced '],
        ROW('\N', NULL), ARRAY[ROW('\N', 1)::public.pair, NULL, ROW(NULL, NULL)::public.pair]);

-- 4: control characters and backslashes; a line that reads \. (COPY's end marker)
INSERT INTO public.all_types (id, c_text, c_varchar, c_char, c_json, c_jsonb, c_text_arr, c_pair)
VALUES (4, E'tab\there\nnewline\r\ncrlf\rcr \\backslash \\\\double \\N \\. end\\',
        E'a\tb\nc\\', E'\t\n\r\\"',
        E'{"s": "tab\\tnl\\ncr\\rbs\\\\", "nul": "\\u0000", "raw":   [1,  2]}',
        E'{"s": "tab\\tnl\\ncr\\rbs\\\\", "u": "\\u00e9x"}',
        ARRAY[E'x\ty', E'line\nbreak', E'back\\slash', E'\\.', E'\r'],
        ROW(E'a "quoted", label\n(with) \\ stuff', 1.5));
UPDATE public.all_types SET c_text = c_text || E'\n\\.\nafter the marker' WHERE id = 4;

-- 5: bytea with zero bytes and every byte value; numbers at their edges
INSERT INTO public.all_types (id, c_bytea, c_int2, c_int4, c_int8, c_numeric, c_num_s, c_real,
                              c_double, c_bool, c_money, c_bit, c_varbit, c_posint)
SELECT 5, '\x00ff00'::bytea || (SELECT string_agg(set_byte('\x00'::bytea, 0, b), ''::bytea ORDER BY b)
                               FROM generate_series(0, 255) b) || '\x0000'::bytea,
       -32768, -2147483648, 9223372036854775807, 'NaN', -99999999999999.999999,
       'NaN', 'NaN', false, '-92233720368547758.08', B'00000000', B'1', 1;
INSERT INTO public.all_types (id, c_int2, c_int4, c_int8, c_numeric, c_num_s, c_real, c_double,
                              c_bool, c_money, c_bit, c_varbit, c_posint)
VALUES (6, 32767, 2147483647, -9223372036854775808, 'Infinity', 0.000001, 'Infinity',
        '-Infinity', true, '92233720368547758.07', B'11111111', B'1010101010101', 2147483647),
       (7, 0, 0, 0, '-Infinity', -0.000001, '-Infinity', 'Infinity', NULL, 0, B'10101010',
        B'0', 42),
       (8, -1, -1, -1, 123456789012345678901234567890.123456789012345678901234567890,
        1.5, 3.4028235e38, 1.0000000000000002, true, '1234.56', B'01010101', B'111', 7),
       (9, 1, 1, 1, -0.0000000000000000000000000001, 0, 1.17549435e-38, '-0', false, '-0.01',
        B'10000001', B'00', 8),
       (10, 2, 2, 2, 1e-300, 1, 'NaN', '4.9e-324', true, '0.01', B'00000001', B'0000000000000001', 9);

-- 11-14: dates and times, with infinities, BC and the edges
INSERT INTO public.all_types (id, c_date, c_time, c_timetz, c_ts, c_tstz, c_interval, c_tstzrange,
                              c_daterange)
VALUES (11, 'infinity', '24:00:00', '23:59:59.999999+14', 'infinity', 'infinity',
        '178000000 years', tstzrange('-infinity', 'infinity'), '[2024-01-01,infinity)'),
       (12, '-infinity', '00:00:00', '00:00:00-12', '-infinity', '-infinity',
        '-178000000 years', tstzrange(NULL, '2024-01-01 00:00+00', '(]'), 'empty'),
       (13, '4713-01-01 BC', '12:34:56.789012', '12:34:56.789012+05:45', '4713-01-01 00:00:00 BC',
        '0044-03-15 12:00:00+00 BC', '-1 days +02:03:04.5', '[2020-01-01 00:00+02,2020-01-02 00:00-02)',
        '[2000-02-29,2000-03-01]'),
       (14, '5874897-12-31', '00:00:00.000001', '00:00:00+00', '294276-12-31 23:59:59.999999',
        '2024-02-29 23:59:59.999999+00', '1 year 2 mons -3 days 04:05:06.000001', 'empty',
        '(,)');

-- 15-20: unicode, identifiers of other kinds, json, networks, geometry, ranges, enums, composites
INSERT INTO public.all_types (id, c_text, c_varchar, c_char, c_json, c_jsonb, c_uuid, c_inet, c_cidr,
                              c_macaddr, c_tsvector, c_point, c_box, c_int4range, c_numrange,
                              c_mood, c_pair, c_pair_arr, c_int_arr, c_2d_arr, c_text_arr)
VALUES (15, 'emoji 😀🎉 family 👨‍👩‍👧‍👦 flag 🇳🇿', 'e' || U&'\0301' || ' combining', 'é😀',
        '{"emoji": "😀", "esc": "\u00e9", "dup": 1, "dup": 2}', '{"emoji": "😀", "esc": "\u00e9"}',
        '00000000-0000-0000-0000-000000000000', '::1', '2001:db8::/32', '08:00:2b:01:02:03',
        $$'quoted ''x''':1A fat:2B cat:3C,4D 😀$$, '(1.5,-2)', '((0,0),(-1.5,2.25))',
        '[1,10)', '(-1.5,2.5]', 'it''s "complicated"', ROW('😀', 'NaN'),
        ARRAY[ROW('a', 1), ROW('b,c', 2), ROW('"d"', NULL)]::public.pair[],
        '{-2147483648,0,NULL,2147483647}', '{{1,2,3},{4,NULL,6}}', ARRAY['שלום', 'مرحبا', 'Ω≈ç√']),
       (16, 'zero width' || U&'\200B' || 'space and BOM' || U&'\FEFF', 'NFC é', 'ab',
        '[]', '[]', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '192.168.0.1/24', '10.0.0.0/8',
        'ff:ff:ff:ff:ff:ff', '', '(0,0)', '((1,1),(1,1))', '(,5]', '(,)', 'sad', ROW(NULL, NULL),
        ARRAY[NULL]::public.pair[], '[-2:-1]={7,8}', '{}', '{}'),
       (17, repeat('long text ', 1000), repeat('x', 40), 'abcde', 'null', 'null',
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '0.0.0.0/0', '0.0.0.0/0', '00:00:00:00:00:00',
        'a:1 b:2', '(1e+300,-1e-300)', '((3,4),(1,2))', '[-2147483648,2147483647)', '[0,0]',
        'happy', ROW('x', -0.0), NULL, NULL, NULL, NULL);
INSERT INTO public.all_types (id, c_text, c_jsonb)
SELECT 100 + g, 'row ' || g || E'\t' || md5(g::text), jsonb_build_object('g', g, 'sq', g * g)
FROM generate_series(1, 200) g;

-- ---------------------------------------------------------------------------
-- Identity (ALWAYS and BY DEFAULT), serial, generated (STORED), a dropped column
-- ---------------------------------------------------------------------------
CREATE TABLE public.ident_always (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    v text
);
INSERT INTO public.ident_always (v) SELECT 'v' || g FROM generate_series(1, 20) g;
DELETE FROM public.ident_always WHERE id IN (3, 7, 20);

CREATE TABLE public.ident_default (
    id bigint GENERATED BY DEFAULT AS IDENTITY (START WITH 100 INCREMENT BY 5) PRIMARY KEY,
    v text
);
INSERT INTO public.ident_default (v) SELECT 'v' || g FROM generate_series(1, 10) g;
INSERT INTO public.ident_default (id, v) VALUES (1, 'explicit id');

CREATE TABLE public.serial_t (
    id serial PRIMARY KEY,
    big bigserial,
    label text NOT NULL DEFAULT 'none' CHECK (label <> 'forbidden'),
    at date
);
CREATE INDEX serial_t_label_idx ON public.serial_t (lower(label));
COMMENT ON INDEX public.serial_t_label_idx IS 'labels, folded';
CREATE STATISTICS public.serial_t_stats (ndistinct) ON label, at FROM public.serial_t;
COMMENT ON TABLE public.serial_t IS 'a table restorable on its own';
COMMENT ON COLUMN public.serial_t.label IS 'its label';
ALTER TABLE public.serial_t OWNER TO fpv_owner;
GRANT SELECT, UPDATE (label) ON public.serial_t TO fpv_reader;
INSERT INTO public.serial_t (label, at)
SELECT 'label ' || g, DATE '2020-01-01' + g FROM generate_series(1, 500) g;
SELECT setval('public.serial_t_big_seq', 9000);

CREATE TABLE public.gen_stored (
    id integer PRIMARY KEY,
    a integer,
    b integer,
    total integer GENERATED ALWAYS AS (a + b) STORED,
    shout text GENERATED ALWAYS AS (upper(coalesce(note, '-'))) STORED,
    note text
);
INSERT INTO public.gen_stored (id, a, b, note)
SELECT g, g, g * 10, CASE WHEN g % 3 = 0 THEN NULL ELSE 'note ' || g END
FROM generate_series(1, 100) g;

CREATE TABLE public.dropped_col (
    id integer PRIMARY KEY,
    gone text,
    keep text,
    gone2 integer,
    tail integer
);
INSERT INTO public.dropped_col SELECT g, 'gone ' || g, 'keep ' || g, g, g * 2
FROM generate_series(1, 100) g;
ALTER TABLE public.dropped_col DROP COLUMN gone;
ALTER TABLE public.dropped_col DROP COLUMN gone2;
ALTER TABLE public.dropped_col ADD COLUMN added_later text DEFAULT 'missing value';
INSERT INTO public.dropped_col (id, keep, tail, added_later) VALUES (101, 'new', 1, NULL);

-- A table without columns: every row is an empty line in COPY
CREATE TABLE public.no_columns ();
INSERT INTO public.no_columns DEFAULT VALUES;
INSERT INTO public.no_columns DEFAULT VALUES;
INSERT INTO public.no_columns DEFAULT VALUES;

-- ---------------------------------------------------------------------------
-- Quoted, mixed-case names with spaces and double quotes
-- ---------------------------------------------------------------------------
CREATE SCHEMA "Weird Schema";
COMMENT ON SCHEMA "Weird Schema" IS 'spaces, "quotes" and case';
CREATE TABLE "Weird Schema"."Order ""Items""" (
    "Item ID" integer PRIMARY KEY,
    "Qty ""x""" integer NOT NULL,
    "select" text,
    "MixedCase" public.mood,
    "dot.ted" text
);
INSERT INTO "Weird Schema"."Order ""Items"""
SELECT g, g % 7, CASE WHEN g % 2 = 0 THEN 'even' END, 'ok', 'a.b ' || g
FROM generate_series(1, 300) g;
CREATE TABLE "Weird Schema"."lower.dot" ("Key" text PRIMARY KEY, "Value" text);
INSERT INTO "Weird Schema"."lower.dot"
VALUES ('', 'empty key'), ('\N', 'backslash N key'), (E'tab\tkey', 'tab'), ('Ä', 'umlaut'),
       ('a', 'lower'), ('A', 'upper'), ('😀', 'emoji');
CREATE SEQUENCE "Weird Schema"."Seq ""Q""" START 10;
SELECT nextval('"Weird Schema"."Seq ""Q"""'), nextval('"Weird Schema"."Seq ""Q"""');
GRANT USAGE ON SCHEMA "Weird Schema" TO fpv_reader;
GRANT SELECT, INSERT ON "Weird Schema"."Order ""Items""" TO fpv_reader;

-- ---------------------------------------------------------------------------
-- No key and duplicate rows; a nullable unique column is not a key
-- ---------------------------------------------------------------------------
CREATE TABLE public.bag (a integer, b text);
INSERT INTO public.bag VALUES (1, 'x'), (1, 'x'), (1, 'x'), (2, NULL), (2, NULL), (NULL, NULL),
                              (NULL, NULL), (3, ''), (3, '\N');
INSERT INTO public.bag SELECT g % 10, 'dup' FROM generate_series(1, 1000) g;

CREATE TABLE public.nullable_unique (u integer UNIQUE, v text);
INSERT INTO public.nullable_unique VALUES (1, 'a'), (NULL, 'b'), (NULL, 'b'), (2, NULL);

-- ---------------------------------------------------------------------------
-- Declarative partitions: range, a default partition, a sub-partitioned one
-- ---------------------------------------------------------------------------
CREATE TABLE public.measurements (
    id bigint NOT NULL,
    day date NOT NULL,
    region text NOT NULL,
    reading numeric,
    PRIMARY KEY (id, day, region)
) PARTITION BY RANGE (day);
CREATE TABLE public.measurements_2023 PARTITION OF public.measurements
    FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE public.measurements_2024 PARTITION OF public.measurements
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY LIST (region);
CREATE TABLE public.measurements_2024_eu PARTITION OF public.measurements_2024 FOR VALUES IN ('eu');
CREATE TABLE public.measurements_2024_rest PARTITION OF public.measurements_2024 DEFAULT;
CREATE TABLE public.measurements_default PARTITION OF public.measurements DEFAULT;
INSERT INTO public.measurements
SELECT g, DATE '2022-10-01' + (g % 900), (ARRAY['eu', 'us', 'apac'])[1 + g % 3], g * 0.5
FROM generate_series(1, 6000) g;

-- Classic inheritance: the parent and the child both have rows
CREATE TABLE public.inh_parent (id integer PRIMARY KEY, name text);
CREATE TABLE public.inh_child (extra text) INHERITS (public.inh_parent);
INSERT INTO public.inh_parent SELECT g, 'parent ' || g FROM generate_series(1, 50) g;
INSERT INTO public.inh_child SELECT g, 'child ' || g, 'extra ' || g FROM generate_series(1, 70) g;

-- ---------------------------------------------------------------------------
-- Circular foreign keys (deferrable) and a self-referencing one
-- ---------------------------------------------------------------------------
CREATE TABLE public.people (id integer PRIMARY KEY, name text NOT NULL, team_id integer NOT NULL);
CREATE TABLE public.teams (
    id integer PRIMARY KEY,
    name text NOT NULL,
    lead_id integer NOT NULL REFERENCES public.people DEFERRABLE INITIALLY DEFERRED
);
ALTER TABLE public.people ADD CONSTRAINT people_team_fk FOREIGN KEY (team_id)
    REFERENCES public.teams DEFERRABLE INITIALLY DEFERRED;
BEGIN;
INSERT INTO public.people SELECT g, 'person ' || g, 1 + g % 10 FROM generate_series(1, 200) g;
INSERT INTO public.teams SELECT g, 'team ' || g, g * 3 FROM generate_series(1, 10) g;
COMMIT;

-- A plain (not deferrable) foreign key whose table is loaded before the one it references
CREATE TABLE public.z_parent (id integer PRIMARY KEY, name text);
CREATE TABLE public.a_child (
    id integer PRIMARY KEY,
    parent_id integer NOT NULL REFERENCES public.z_parent ON DELETE CASCADE
);
INSERT INTO public.z_parent SELECT g, 'parent ' || g FROM generate_series(1, 20) g;
INSERT INTO public.a_child SELECT g, 1 + g % 20 FROM generate_series(1, 200) g;

CREATE TABLE public.employees (
    id integer PRIMARY KEY,
    manager_id integer REFERENCES public.employees,
    name text
);
INSERT INTO public.employees SELECT g, nullif(g / 2, 0), 'employee ' || g FROM generate_series(1, 500) g;

-- ---------------------------------------------------------------------------
-- Triggers: an audit trigger that writes to an audit table, and a BEFORE trigger
-- that changes the row.  If either fired during a restore, the data would differ.
-- ---------------------------------------------------------------------------
CREATE TABLE public.audit_log (
    id bigserial PRIMARY KEY,
    tbl text NOT NULL,
    op text NOT NULL,
    row_data jsonb,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE public.accounts (
    id integer PRIMARY KEY,
    owner text NOT NULL,
    balance numeric(12, 2) NOT NULL,
    touched integer NOT NULL DEFAULT 0
);
CREATE FUNCTION public.audit_fn() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.audit_log (tbl, op, row_data) VALUES (TG_TABLE_NAME, TG_OP, to_jsonb(NEW));
  RETURN NEW;
END
$$;
CREATE FUNCTION public.touch_fn() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.touched := NEW.touched + 1;
  RETURN NEW;
END
$$;
CREATE TRIGGER accounts_audit AFTER INSERT OR UPDATE ON public.accounts
    FOR EACH ROW EXECUTE FUNCTION public.audit_fn();
CREATE TRIGGER accounts_touch BEFORE INSERT OR UPDATE ON public.accounts
    FOR EACH ROW EXECUTE FUNCTION public.touch_fn();
CREATE TRIGGER people_audit AFTER INSERT OR UPDATE ON public.people
    FOR EACH ROW EXECUTE FUNCTION public.audit_fn();
INSERT INTO public.accounts (id, owner, balance)
SELECT g, 'owner ' || (g % 5), g * 10.25 FROM generate_series(1, 50) g;
UPDATE public.accounts SET balance = balance + 1 WHERE id <= 10;

-- ---------------------------------------------------------------------------
-- FORCE ROW LEVEL SECURITY with a policy that hides most rows
-- ---------------------------------------------------------------------------
CREATE TABLE public.secrets (id integer PRIMARY KEY, visible boolean NOT NULL, payload text);
INSERT INTO public.secrets SELECT g, g % 10 = 0, 'secret ' || g FROM generate_series(1, 100) g;
ALTER TABLE public.secrets OWNER TO fpv_owner;
ALTER TABLE public.secrets ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.secrets FORCE ROW LEVEL SECURITY;
CREATE POLICY secrets_visible ON public.secrets USING (visible);

-- ---------------------------------------------------------------------------
-- Views: a materialized view with data, one without, and a plain view
-- ---------------------------------------------------------------------------
CREATE MATERIALIZED VIEW public.account_totals AS
    SELECT owner, sum(balance) AS total, count(*) AS n FROM public.accounts GROUP BY owner;
CREATE UNIQUE INDEX account_totals_owner ON public.account_totals (owner);
CREATE MATERIALIZED VIEW public.never_refreshed AS SELECT id FROM public.accounts WITH NO DATA;
CREATE VIEW public.team_members AS
    SELECT t.name AS team, p.name AS person FROM public.teams t JOIN public.people p ON p.team_id = t.id;
COMMENT ON VIEW public.team_members IS 'who is in which team';
GRANT SELECT ON public.team_members TO fpv_reader;

-- ---------------------------------------------------------------------------
-- An unlogged table; a bigger table (many chunks); a 16 MiB value
-- ---------------------------------------------------------------------------
CREATE UNLOGGED TABLE public.scratch (id integer PRIMARY KEY, v text);
INSERT INTO public.scratch SELECT g, md5(g::text) FROM generate_series(1, 1000) g;

CREATE TABLE public.events (
    id bigint PRIMARY KEY,
    kind text NOT NULL,
    payload text,
    amount numeric(10, 2)
);
INSERT INTO public.events
SELECT g, (ARRAY['click', 'view', 'buy'])[1 + g % 3], md5(g::text) || md5((g * 7)::text), g % 1000 / 10.0
FROM generate_series(1, 30000) g;

CREATE TABLE public.big_value (id integer PRIMARY KEY, data bytea NOT NULL, note text);
INSERT INTO public.big_value
SELECT 1, decode(string_agg(md5(g::text), '' ORDER BY g), 'hex'), 'sixteen MiB of md5 output'
FROM generate_series(1, 1048576) g;
INSERT INTO public.big_value VALUES (2, '\x', 'empty');

-- ---------------------------------------------------------------------------
-- 300 small tables
-- ---------------------------------------------------------------------------
CREATE SCHEMA many;
DO $$
BEGIN
  FOR i IN 1..300 LOOP
    EXECUTE format('CREATE TABLE many.%I (id integer PRIMARY KEY, v text)', 't' || lpad(i::text, 3, '0'));
    EXECUTE format('INSERT INTO many.%I SELECT g, md5(g::text) FROM generate_series(1, %s) g',
                   't' || lpad(i::text, 3, '0'), i % 7);
  END LOOP;
END
$$;

-- ---------------------------------------------------------------------------
-- Sequences: advanced with setval, not called, untouched
-- ---------------------------------------------------------------------------
CREATE SEQUENCE public.seq_advanced INCREMENT BY 7 START 3;
SELECT setval('public.seq_advanced', 12345);
CREATE SEQUENCE public.seq_not_called;
SELECT setval('public.seq_not_called', 42, false);
CREATE SEQUENCE public.seq_untouched;
CREATE SEQUENCE public.seq_descending INCREMENT BY -1 MINVALUE -1000 MAXVALUE -1 START -1;
SELECT nextval('public.seq_descending'), nextval('public.seq_descending');

-- ---------------------------------------------------------------------------
-- Large objects: a small one, a ~3 MiB one, an empty one
-- ---------------------------------------------------------------------------
SELECT lo_from_bytea(91001, convert_to(E'small large object\nwith a newline', 'UTF8') || '\x00ff'::bytea);
SELECT lo_from_bytea(91002, (SELECT decode(string_agg(md5(g::text), '' ORDER BY g), 'hex')
                             FROM generate_series(1, 196608) g));
SELECT lo_create(91003);
COMMENT ON LARGE OBJECT 91001 IS 'the small one';
ALTER LARGE OBJECT 91002 OWNER TO fpv_owner;
GRANT SELECT ON LARGE OBJECT 91001 TO fpv_reader;

-- ---------------------------------------------------------------------------
-- Values whose text depends on the reading session: reg* names print unqualified
-- when their schema is on search_path (and restore empties it); timestamptz, also
-- in a default, prints in the session's TimeZone
-- ---------------------------------------------------------------------------
CREATE TABLE public.catalog_refs (
    id    integer PRIMARY KEY,
    rel   regclass,
    typ   regtype,
    fn    regprocedure,
    nsp   regnamespace,
    cfg   regconfig,
    at    timestamptz DEFAULT '2020-06-01 12:00:00+00'
);
INSERT INTO public.catalog_refs VALUES
    (1, 'public.accounts', 'public.mood', 'public.add_tax(numeric)', 'public', 'english',
     '2026-03-29 01:30:00+00'),
    (2, '"Weird Schema"."Order ""Items"""', 'integer[]', 'pg_catalog.now()', 'many',
     'pg_catalog.simple', '-infinity'),
    (3, 'public.catalog_refs', 'public.pair', 'public.audit_fn()', '"Weird Schema"', NULL,
     DEFAULT);

-- ---------------------------------------------------------------------------
-- Grants and comments
-- ---------------------------------------------------------------------------
GRANT SELECT ON public.all_types TO fpv_reader;
GRANT SELECT (id, name) ON public.people TO fpv_reader;
GRANT EXECUTE ON FUNCTION public.add_tax(numeric) TO fpv_reader;
REVOKE EXECUTE ON FUNCTION public.audit_fn() FROM PUBLIC;
COMMENT ON SEQUENCE public.seq_advanced IS 'advanced with setval';
COMMENT ON CONSTRAINT people_team_fk ON public.people IS 'one half of a cycle';
COMMENT ON TRIGGER accounts_audit ON public.accounts IS 'writes audit_log';
COMMENT ON POLICY secrets_visible ON public.secrets IS 'hides most rows';
ANALYZE;
