//! What an idle entity actor costs in resident memory, apart from its
//! state: N trivial ractor actors (no state, no timer) against N bare tokio
//! tasks each waiting on a channel, and the size of the daemon's own
//! per-entity structs. Run it alone (it reads its own RSS):
//!
//! ```sh
//! cargo bench --bench actor_cost -- 100000
//! ```

use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::time::Duration;

struct Idle;

impl Actor for Idle {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<()>, _args: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(|a| a.parse().expect("N"))
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let before = rss_kib();
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Box<u64>>();
            tasks.push((tx, tokio::spawn(async move { rx.recv().await })));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tokio_task = (rss_kib() - before) as f64 * 1024.0 / n as f64;
        drop(tasks);
        tokio::time::sleep(Duration::from_millis(200)).await;

        let before = rss_kib();
        let mut actors = Vec::with_capacity(n);
        for _ in 0..n {
            actors.push(Actor::spawn(None, Idle, ()).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ractor_actor = (rss_kib() - before) as f64 * 1024.0 / n as f64;
        // The same with one armed `send_after` timer each (a tokio task
        // sleeping), as a policy actor keeps for its time threshold.
        let before = rss_kib();
        let timers: Vec<_> = actors
            .iter()
            .map(|(actor, _)| actor.send_after(Duration::from_secs(3600), || ()))
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let timer = (rss_kib() - before) as f64 * 1024.0 / n as f64;
        for timer in timers {
            timer.abort();
        }
        for (actor, handle) in actors {
            actor.stop(None);
            let _ = handle.await;
        }

        println!("idle entities:             {n}");
        println!("tokio task + unbounded channel: {tokio_task:.0} B each");
        println!("ractor actor (no state):   {ractor_actor:.0} B each");
        println!("one armed send_after timer: {timer:.0} B each");
        println!(
            "snapshotd PolicyState:     {} B inline (plus its heap: state map, windows)",
            std::mem::size_of::<snapshotd::actors::policy::PolicyState>()
        );
        println!(
            "snapshotd PolicyMsg:       {} B, RouterMsg {} B, WriterMsg {} B",
            std::mem::size_of::<snapshotd::actors::messages::PolicyMsg>(),
            std::mem::size_of::<snapshotd::actors::messages::RouterMsg>(),
            std::mem::size_of::<snapshotd::actors::messages::WriterMsg>(),
        );
    });
}
