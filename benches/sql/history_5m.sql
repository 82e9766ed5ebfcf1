-- A history of 5,000,000 stabilize-shaped events (50,000 workflows x 100:
-- created, started, then tasks started/completed with ~500-byte outputs, so
-- states grow to ~25 KB) for measuring `snapshotd backfill`. Run it on a
-- database where stabilize created its tables (e.g. gen_workflows.py with
-- --workflows 1), then: snapshotd backfill --database-url URL
INSERT INTO events (event_id, event_type, timestamp, entity_type, entity_id, workflow_id, version, data, correlation_id)
SELECT lpad(to_hex(w*1000+i), 26, '0'),
  CASE WHEN i=1 THEN 'workflow.created' WHEN i=2 THEN 'workflow.started' WHEN i%2=1 THEN 'task.started' ELSE 'task.completed' END,
  now() - interval '30 days' + (w*100+i) * interval '1 ms',
  CASE WHEN i<=2 THEN 'workflow' ELSE 'task' END,
  CASE WHEN i<=2 THEN wid ELSE lpad('T'||to_hex(w*100 + (i+1)/2), 26, '0') END,
  wid, i,
  CASE WHEN i=1 THEN '{"application":"bench","name":"load"}'::jsonb WHEN i=2 THEN '{"context":{"k":1}}'::jsonb
       WHEN i%2=1 THEN jsonb_build_object('name','task','stage_id','S','implementing_class','x.Y','start_time',5)
       ELSE jsonb_build_object('name','task','status','SUCCEEDED','outputs', jsonb_build_object('blob', repeat('x', 500), 'n', i)) END,
  'c'
FROM generate_series(0,49999) w CROSS JOIN generate_series(1,100) i CROSS JOIN LATERAL (select lpad('W'||to_hex(w), 26, '0') wid) x
ORDER BY w, i;
ANALYZE events;
SELECT count(*), pg_size_pretty(pg_total_relation_size('events')) FROM events;
