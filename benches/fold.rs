//! Criterion micro-benches of the fold path on stabilize-shaped data:
//! decoding one ~600-byte event, each reducer step, and canonical JSON +
//! SHA-256 + the stored text of workflow states of about 4, 35 and 70 KB.
//!
//! ```sh
//! cargo bench --bench fold
//! cargo bench --bench fold -- canonical   # one group
//! # Instructions, which do not vary between runs as times do on a shared
//! # machine: the `workflow` group's work, N times, under cachegrind.
//! FOLD_INSTRUCTIONS=20 valgrind --tool=cachegrind --cache-sim=no \
//!     --cachegrind-out-file=/dev/null target/release/deps/fold-<hash>
//! ```
//! The end-to-end figures are `benches/load.rs`'s; these say where the time
//! of one event goes.

use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use serde_json::{Value, json};
use snapshotd::model::canonical::NumberForm;
use snapshotd::model::event::{Event, Frame, Limits, decode, decode_reference};
use snapshotd::model::ledger::Ledger;
use snapshotd::model::{EntityKey, EntityType, PreparedSnapshot};
use snapshotd::reducer::{Reducer, State};
use std::hint::black_box;
use std::sync::Arc;

const LIMITS: Limits = Limits {
    max_depth: 64,
    numbers: NumberForm::Jsonb,
};

/// One event line as stabilize's recorder writes it (~600 bytes for a
/// completed task with outputs).
fn line(seq: u64, event_type: &str, entity_type: &str, entity_id: &str, data: Value) -> String {
    json!({
        "event_id": format!("01JDEV{seq:020}"),
        "event_type": event_type,
        "timestamp": "2026-11-26T03:59:48.120000+00:00",
        "sequence": seq,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "workflow_id": "01JDBENCHWORKFLOW000000000",
        "version": seq,
        "data": data,
        "metadata": {"correlation_id": "01JDBENCHWORKFLOW000000000", "causation_id": null,
                     "actor": "system", "source_handler": "task_runner"},
        "schema_version": 1,
    })
    .to_string()
}

fn event(text: &str) -> Event {
    match decode(text.as_bytes(), LIMITS) {
        Ok(Frame::Event(event)) => event,
        other => panic!("not an event: {other:?}"),
    }
}

/// A workflow's lifecycle with `tasks` tasks (in stages of 5), as lines.
fn workflow(tasks: usize) -> Vec<String> {
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };
    let mut lines = vec![
        line(
            next(),
            "workflow.created",
            "workflow",
            "01JDBENCHWORKFLOW000000000",
            json!({"application": "billing", "name": "nightly-invoices"}),
        ),
        line(
            next(),
            "workflow.started",
            "workflow",
            "01JDBENCHWORKFLOW000000000",
            json!({"context": {"region": "eu-west-1", "batch": 1000, "ratio": 0.1}}),
        ),
    ];
    for t in 0..tasks {
        let stage = format!("01JDSTAGE{:017}", t / 5);
        if t % 5 == 0 {
            lines.push(line(
                next(),
                "stage.started",
                "stage",
                &stage,
                json!({"ref_id": format!("stage-{}", t / 5), "type": "task", "name": format!("Stage {}", t / 5)}),
            ));
        }
        let task = format!("01JDTASK{t:018}");
        lines.push(line(
            next(),
            "task.started",
            "task",
            &task,
            json!({"name": format!("charge-customer-{t}"), "stage_id": stage}),
        ));
        lines.push(line(
            next(),
            "task.completed",
            "task",
            &task,
            json!({"status": "SUCCEEDED", "outputs": {
                "invoice_id": format!("INV-{t:08}"), "amount": 1234.5 + t as f64,
                "currency": "EUR", "lines": [{"sku": "A-1", "qty": 3, "price": 9.99},
                                              {"sku": "B-2", "qty": 1, "price": 120.0}],
                "note": "x".repeat(120)}}),
        ));
        if t % 5 == 4 {
            lines.push(line(
                next(),
                "stage.completed",
                "stage",
                &stage,
                json!({"status": "SUCCEEDED"}),
            ));
        }
    }
    lines
}

fn key() -> EntityKey {
    EntityKey::new(EntityType::Workflow, "01JDBENCHWORKFLOW000000000")
}

/// The state after folding a workflow of `tasks` tasks, and its canonical size.
fn state_of(tasks: usize) -> (State, usize) {
    let mut state = Reducer::Stabilize.initial(&key());
    for text in workflow(tasks) {
        Reducer::Stabilize.fold(&mut state, &event(&text));
    }
    let prepared = prepare(&state);
    (state, prepared.canonical_bytes)
}

fn prepare(state: &State) -> PreparedSnapshot {
    PreparedSnapshot::from_state(key(), Arc::from("01JDBENCHWORKFLOW000000000"), 1, 1, state)
        .expect("storable")
}

fn decoding(c: &mut Criterion) {
    let lines = workflow(5);
    let completed = lines
        .iter()
        .find(|l| l.contains("task.completed"))
        .unwrap()
        .clone();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Bytes(completed.len() as u64));
    group.bench_function(format!("task.completed ({} B)", completed.len()), |b| {
        b.iter(|| decode(black_box(completed.as_bytes()), LIMITS))
    });
    // serde's parse of the envelope, which decode leaves refusals to.
    group.bench_function("task.completed, the reference way", |b| {
        b.iter(|| decode_reference(black_box(completed.as_bytes()), LIMITS))
    });
    group.finish();
}

fn reducing(c: &mut Criterion) {
    // Each step into the state of a workflow 57 tasks in (~35 KB).
    let (state, _) = state_of(57);
    let steps = [
        line(
            9001,
            "task.started",
            "task",
            "01JDTASKNEW000000000000000",
            json!({"name": "new-task", "stage_id": "01JDSTAGE00000000000000019"}),
        ),
        workflow(1)
            .into_iter()
            .find(|l| l.contains("task.completed"))
            .unwrap(),
        line(
            9002,
            "stage.completed",
            "stage",
            "01JDSTAGE00000000000000019",
            json!({"status": "SUCCEEDED"}),
        ),
        line(
            9003,
            "context.updated",
            "workflow",
            "01JDBENCHWORKFLOW000000000",
            json!({"context": {"cursor": 17, "last": "INV-00000017"}}),
        ),
    ];
    let mut group = c.benchmark_group("reduce");
    for text in &steps {
        let event = event(text);
        group.bench_function(&*event.event_type, |b| {
            b.iter_batched_ref(
                || state.clone(),
                |state| Reducer::Stabilize.fold(state, black_box(&event)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn canonical(c: &mut Criterion) {
    let mut group = c.benchmark_group("canonical + hash + stored text");
    // About 4, 35 and 70 KB of canonical text.
    for tasks in [6, 57, 115] {
        let (state, bytes) = state_of(tasks);
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(format!("{} KB state", bytes / 1000), |b| {
            b.iter(|| prepare(black_box(&state)))
        });
    }
    group.finish();
}

/// What the daemon does with each line of a workflow before any snapshot:
/// decode it and hand it to the entity's ledger (duplicate check, fold).
fn fold_workflow(lines: &[String]) -> Ledger {
    let reducer = Reducer::Stabilize;
    let mut ledger = Ledger::new(reducer, reducer.initial(&key()));
    for text in lines {
        ledger.receive(event(text), true);
    }
    ledger
}

fn workflow_fold(c: &mut Criterion) {
    let lines = workflow(57);
    let mut group = c.benchmark_group("workflow");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function(format!("decode + ledger, {} events", lines.len()), |b| {
        b.iter(|| fold_workflow(black_box(&lines)))
    });
    group.finish();
}

criterion_group!(benches, decoding, reducing, canonical, workflow_fold);

fn main() {
    if let Some(times) = std::env::var_os("FOLD_INSTRUCTIONS") {
        let times: usize = times
            .to_str()
            .and_then(|t| t.parse().ok())
            .expect("FOLD_INSTRUCTIONS=N");
        let lines = workflow(57);
        for _ in 0..times {
            black_box(fold_workflow(black_box(&lines)));
        }
        println!("folded {} events {times} times", lines.len());
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
