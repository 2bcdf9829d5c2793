//! The harness itself: the echo upstream, both protocols, stats, the runtime
//! switch, and that no Envoy outlives the process that started it.

use std::time::Duration;

use gateway_tests::client::RequestBuilder;
use gateway_tests::envoy::{Envoy, EnvoyConfig};
use gateway_tests::upstream::{EchoUpstream, Reply};
use gateway_tests::{process, wait_until};

#[test]
fn echo_upstream_describes_and_counts_requests() {
    let upstream = EchoUpstream::start("echo");
    let response = RequestBuilder::new(upstream.addr, "POST", "/a/b?x=1")
        .header("x-test", "one")
        .header("x-test", "two")
        .body("hello")
        .send();
    assert_eq!(response.status, 200);
    let echo = response.echo();
    assert_eq!(echo.upstream(), "echo");
    assert_eq!(echo.method(), "POST");
    assert_eq!(echo.path(), "/a/b");
    assert_eq!(echo.query(), Some("x=1"));
    assert_eq!(echo.header_all("x-test"), vec!["one", "two"]);
    assert_eq!(echo.0["body"], "hello");
    assert_eq!(upstream.served(), 1);

    let steered = RequestBuilder::new(upstream.addr, "GET", "/s")
        .header("x-echo-status", "418")
        .header("x-echo-header", "cache-control: max-age=5")
        .header("x-echo-body-size", "3")
        .send();
    assert_eq!(steered.status, 418);
    assert_eq!(steered.header("cache-control").as_deref(), Some("max-age=5"));
    assert_eq!(steered.body, b"xxx");

    upstream.script("/scripted", Reply::status(201).header("etag", "\"v1\"").body("done"));
    let scripted = RequestBuilder::new(upstream.addr, "GET", "/scripted?q").send();
    assert_eq!((scripted.status, scripted.text().as_str()), (201, "done"));
    assert_eq!(scripted.header("etag").as_deref(), Some("\"v1\""));
    assert_eq!(upstream.served_path("/scripted"), 1);
    assert_eq!(upstream.served(), 3);

    let started = std::time::Instant::now();
    RequestBuilder::new(upstream.addr, "GET", "/slow").header("x-echo-delay-ms", "200").send();
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn envoy_proxies_http1_and_http2_and_reports_stats() {
    let upstream = EchoUpstream::start("backend");
    let envoy = Envoy::start(&EnvoyConfig::new(&upstream));
    let h1 = envoy.get("/one").header("x-client", "h1").send();
    assert_eq!(h1.status, 200);
    assert_eq!(h1.echo().upstream(), "backend");
    assert_eq!(h1.echo().header("x-client"), Some("h1"));

    // HTTP/2: cookies sent as separate crumbs, authority as :authority.
    let h2 =
        envoy.get("/two").http2().authority("api.example.com").header("cookie", "a=1").header("cookie", "b=2").send();
    assert_eq!(h2.status, 200);
    assert_eq!(h2.echo().header("host"), Some("api.example.com"));
    let cookies = h2.echo().header_all("cookie").join("; ");
    assert!(cookies.contains("a=1") && cookies.contains("b=2"), "cookies reached upstream: {cookies}");
    assert_eq!(upstream.served(), 2);

    assert!(wait_until(Duration::from_secs(5), || envoy.stat("http.gateway.downstream_rq_completed") >= 2));
    assert!(envoy.prometheus().contains("envoy_http_downstream_rq_completed"));
}

#[test]
fn client_address_is_the_peer_not_x_forwarded_for() {
    let upstream = EchoUpstream::start("backend");
    let envoy = Envoy::start(&EnvoyConfig::new(&upstream));
    let response = envoy.get("/").header("x-forwarded-for", "203.0.113.9").send();
    // x-envoy-external-address is the client address Envoy trusts: the peer of
    // the connection (we connect from loopback), not what the client wrote.
    // (For loopback peers Envoy appends the host's own address to XFF.)
    let echo = response.echo();
    assert_eq!(echo.header("x-envoy-external-address"), Some("127.0.0.1"));
    assert!(echo.header("x-forwarded-for").unwrap_or_default().starts_with("203.0.113.9,"));
}

/// Run only as a child of `envoy_dies_when_the_test_process_is_killed`.
#[test]
#[ignore = "helper: run by envoy_dies_when_the_test_process_is_killed"]
fn child_process_holding_envoy() {
    let Some(pid_file) = std::env::var_os("GATEWAY_TEST_ENVOY_PID_FILE") else {
        return;
    };
    let upstream = EchoUpstream::start("backend");
    let envoy = Envoy::start(&EnvoyConfig::new(&upstream));
    std::fs::write(pid_file, envoy.pid().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn envoy_dies_when_the_test_process_is_killed() {
    let dir = gateway_tests::paths::run_dir("orphan-check");
    let pid_file = dir.join("envoy.pid");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "harness::child_process_holding_envoy", "--ignored", "--nocapture"])
        .env("GATEWAY_TEST_ENVOY_PID_FILE", &pid_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = wait_until(Duration::from_secs(60), || pid_file.exists());
    let envoy_pid: u32 = if started { std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap() } else { 0 };
    // SIGKILL: no destructor, no atexit, nothing in the test process runs.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(started, "the child test never started Envoy");
    assert!(
        wait_until(Duration::from_secs(10), || !process::is_running(envoy_pid)),
        "Envoy {envoy_pid} outlived the killed test process"
    );
    let _ = std::fs::remove_dir_all(dir);
}
