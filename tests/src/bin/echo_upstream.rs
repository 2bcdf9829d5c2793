//! The echo upstream as a standalone server for `make run`'s demo backends:
//! `echo-upstream users:9101 orders:9102 ...` serves each name on its port
//! until Ctrl-C (or SIGTERM).

use gateway_tests::upstream::EchoUpstream;

fn main() {
    let backends: Vec<(String, u16)> = std::env::args()
        .skip(1)
        .filter_map(|arg| {
            let (name, port) = arg.split_once(':')?;
            Some((name.to_string(), port.parse().ok()?))
        })
        .collect();
    if backends.is_empty() {
        eprintln!("usage: echo-upstream <name>:<port> [<name>:<port> ...]");
        std::process::exit(2);
    }
    gateway_tests::runtime().block_on(async {
        for (name, port) in &backends {
            let upstream = EchoUpstream::start_async(name, *port).await;
            println!("backend {name:<10} http://{}", upstream.addr);
        }
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    });
}
