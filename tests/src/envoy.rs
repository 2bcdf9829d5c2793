//! Real Envoy processes for tests: a config rendered from a template, a process
//! tied to the test process, readiness from the admin `/ready`, stats helpers,
//! and the Envoy log printed when a test fails.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::RequestBuilder;
use crate::upstream::EchoUpstream;
use crate::{paths, process};

/// One `envoy.filters.http.wasm` entry in the chain.
#[derive(Debug, Clone)]
pub struct WasmFilter {
    /// Module name: `dist/<module>.wasm`.
    pub module: String,
    /// Plugin configuration, passed verbatim (may be invalid on purpose).
    pub configuration: String,
    /// Defaults to the module name.
    pub vm_id: Option<String>,
    /// Envoy's `failure_policy`; `FAIL_CLOSED` unless set.
    pub failure_policy: &'static str,
    /// The plugin's `name` (metrics, shared-data namespace); defaults to the vm_id.
    pub name: Option<String>,
}

impl WasmFilter {
    pub fn new(module: &str, configuration: Value) -> Self {
        Self::raw(module, &configuration.to_string())
    }

    pub fn raw(module: &str, configuration: &str) -> Self {
        Self {
            module: module.to_string(),
            configuration: configuration.to_string(),
            vm_id: None,
            failure_policy: "FAIL_CLOSED",
            name: None,
        }
    }

    pub fn vm_id(mut self, vm_id: &str) -> Self {
        self.vm_id = Some(vm_id.to_string());
        self
    }

    /// A plugin name of its own (Istio's case: several plugins, no `vm_id` of their own).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    pub fn failure_policy(mut self, policy: &'static str) -> Self {
        self.failure_policy = policy;
        self
    }
}

/// How the route table sends requests upstream.
#[derive(Debug, Clone)]
pub enum Routes {
    /// Everything to this cluster.
    Cluster(String),
    /// The cluster named by this request header (what routing.wasm sets).
    ClusterHeader(String),
    /// A literal `routes:` YAML list, indented for a virtual host.
    Yaml(String),
}

#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    pub filters: Vec<WasmFilter>,
    /// Clusters by name; each is an echo upstream (or any HTTP/1.1 server).
    pub clusters: Vec<(String, SocketAddr)>,
    /// HTTP/2 clusters for gRPC services (a rate-limit service).
    pub grpc_clusters: Vec<(String, SocketAddr)>,
    pub routes: Routes,
    /// Worker threads (`--concurrency`).
    pub concurrency: u32,
    /// `xff_num_trusted_hops` of the connection manager (0: the peer is the client).
    pub xff_trusted_hops: u32,
    /// TLS on the listener (HTTPS only), optionally verifying client certificates.
    pub tls: Option<DownstreamTls>,
}

/// A TLS listener: Envoy's certificate, and the CA it verifies client
/// certificates with (a client may also connect without one unless required).
#[derive(Debug, Clone)]
pub struct DownstreamTls {
    pub server: crate::tls::CertifiedKey,
    pub client_ca: std::path::PathBuf,
    pub require_client_certificate: bool,
}

impl EnvoyConfig {
    /// A chain of `filters` in front of one upstream, named after it.
    pub fn new(upstream: &EchoUpstream) -> Self {
        Self {
            filters: Vec::new(),
            clusters: vec![(upstream.name().to_string(), upstream.addr)],
            routes: Routes::Cluster(upstream.name().to_string()),
            grpc_clusters: Vec::new(),
            concurrency: 2,
            xff_trusted_hops: 0,
            tls: None,
        }
    }

    pub fn tls(mut self, tls: DownstreamTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Trust `hops` proxies in front (their `x-forwarded-for` / `x-forwarded-proto`).
    pub fn xff_trusted_hops(mut self, hops: u32) -> Self {
        self.xff_trusted_hops = hops;
        self
    }

    pub fn filter(mut self, filter: WasmFilter) -> Self {
        self.filters.push(filter);
        self
    }

    pub fn cluster(mut self, upstream: &EchoUpstream) -> Self {
        self.clusters.push((upstream.name().to_string(), upstream.addr));
        self
    }

    /// An HTTP/1.1 cluster `name` for a server at `addr` (an IdP, a dead port).
    pub fn http_cluster(mut self, name: &str, addr: SocketAddr) -> Self {
        self.clusters.push((name.to_string(), addr));
        self
    }

    /// An HTTP/2 cluster `name` for a gRPC service at `addr`.
    pub fn grpc_cluster(mut self, name: &str, addr: SocketAddr) -> Self {
        self.grpc_clusters.push((name.to_string(), addr));
        self
    }

    pub fn routes(mut self, routes: Routes) -> Self {
        self.routes = routes;
        self
    }

    pub fn concurrency(mut self, workers: u32) -> Self {
        self.concurrency = workers;
        self
    }

    /// The bootstrap YAML. Ports are 0: Envoy picks free ones and we ask it which.
    pub fn render(&self) -> String {
        let runtime = paths::wasm_runtime();
        let mut filters = String::new();
        for filter in &self.filters {
            let module = paths::module(&filter.module);
            let vm_id = filter.vm_id.clone().unwrap_or_else(|| filter.module.clone());
            let name = filter.name.clone().unwrap_or_else(|| vm_id.clone());
            let _ = write!(
                filters,
                r#"
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: {module}
                failure_policy: {failure_policy}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {configuration}
                vm_config:
                  vm_id: {vm_id}
                  runtime: {runtime}
                  code:
                    local:
                      filename: {filename}"#,
                module = filter.module,
                failure_policy = filter.failure_policy,
                configuration = serde_json::to_string(&filter.configuration).unwrap_or_default(),
                filename = module.display(),
            );
        }
        let routes = match &self.routes {
            Routes::Cluster(cluster) => {
                format!("\n              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: {cluster}, timeout: 30s }}")
            }
            Routes::ClusterHeader(header) => format!(
                "\n              - match: {{ prefix: \"/\" }}\n                route: {{ cluster_header: {header}, timeout: 30s }}"
            ),
            Routes::Yaml(yaml) => yaml.clone(),
        };
        let mut clusters = String::new();
        let plain = self.clusters.iter().map(|cluster| (cluster, ""));
        let http2 = r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }"#;
        let grpc = self.grpc_clusters.iter().map(|cluster| (cluster, http2));
        for ((name, addr), options) in plain.chain(grpc) {
            let _ = write!(
                clusters,
                r#"
  - name: {name}
    type: STATIC
    connect_timeout: 2s{options}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {ip}, port_value: {port} }}"#,
                ip = addr.ip(),
                port = addr.port(),
            );
        }
        let transport_socket = match &self.tls {
            None => String::new(),
            Some(tls) => format!(
                r#"transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: {required}
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{ filename: {cert} }}
              private_key: {{ filename: {key} }}
            validation_context:
              trusted_ca: {{ filename: {ca} }}
      "#,
                required = tls.require_client_certificate,
                cert = tls.server.cert.display(),
                key = tls.server.key.display(),
                ca = tls.client_ca.display(),
            ),
        };
        format!(
            r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: gateway
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - {transport_socket}filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          codec_type: AUTO
          # The peer address is the client's; never a client-supplied x-forwarded-for.
          use_remote_address: true
          xff_num_trusted_hops: {hops}
          route_config:
            name: gateway
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:{routes}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:{clusters}
"#,
            hops = self.xff_trusted_hops,
        )
    }
}

/// Starts Envoy with `module` configured as `configuration` and checks that it
/// refuses the config with a log line `<module>: invalid configuration: ...`
/// naming `field`.
pub fn assert_config_refused(upstream: &EchoUpstream, module: &str, configuration: &str, field: &str) {
    let config = EnvoyConfig::new(upstream).filter(WasmFilter::raw(module, configuration));
    match Envoy::try_start(&config) {
        Ok(_) => panic!("Envoy accepted an invalid {module} config: {configuration}"),
        Err(failure) => {
            let marker = format!("{module}: invalid configuration");
            let line = failure.log.lines().find(|line| line.contains(&marker) && line.contains(field));
            assert!(line.is_some(), "no `{marker}` line naming {field} for {configuration}:\n{}", failure.log);
        }
    }
}

/// Why Envoy did not become ready.
#[derive(Debug)]
pub struct StartFailure {
    pub exit_code: Option<i32>,
    pub log: String,
}

/// A running Envoy. Killed on drop; its log is printed if the test is failing.
pub struct Envoy {
    child: Child,
    pub dir: PathBuf,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
}

impl Envoy {
    /// Starts Envoy and waits until it is ready; panics with its log otherwise.
    pub fn start(config: &EnvoyConfig) -> Envoy {
        Self::try_start(config).unwrap_or_else(|failure| {
            panic!("Envoy did not start (exit {:?}). Log:\n{}", failure.exit_code, failure.log)
        })
    }

    /// Starts Envoy; `Err` with its log when it exits or is not ready in 30 s.
    pub fn try_start(config: &EnvoyConfig) -> Result<Envoy, StartFailure> {
        Self::try_start_yaml(&config.render(), config.concurrency)
    }

    /// Starts Envoy on a literal bootstrap (used for the shipped `envoy/` configs,
    /// whose admin and listener ports are rewritten to 0 by the caller).
    pub fn try_start_yaml(yaml: &str, concurrency: u32) -> Result<Envoy, StartFailure> {
        let dir = paths::run_dir("envoy");
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, yaml).expect("write envoy config");
        let log_path = dir.join("envoy.log");
        let admin_path = dir.join("admin.address");
        let mut command = Command::new(paths::envoy_binary());
        command
            .arg("-c")
            .arg(&config_path)
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .arg("--disable-hot-restart")
            .arg("--log-level")
            .arg("info")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .current_dir(paths::workspace_root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Envoy's own --log-path file is flushed only every few seconds;
            // stderr is written line by line, so tests can poll the log.
            .stderr(Stdio::from(std::fs::File::create(&log_path).expect("create envoy log")));
        let mut child = process::spawn(command).expect("spawn envoy");
        let read_log = |dir: &PathBuf| std::fs::read_to_string(dir.join("envoy.log")).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(StartFailure { exit_code: status.code(), log: read_log(&dir) });
            }
            if let Some(admin) = std::fs::read_to_string(&admin_path).ok().and_then(|a| a.trim().parse().ok()) {
                if admin_get(admin, "/ready").is_some_and(|(status, _)| status == 200) {
                    let listener = first_listener(admin);
                    if let Some(listener) = listener {
                        return Ok(Envoy { child, dir, admin, listener });
                    }
                }
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartFailure { exit_code: None, log: read_log(&dir) });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        RequestBuilder::new(self.listener, "GET", path)
    }

    pub fn request(&self, method: &str, path: &str) -> RequestBuilder {
        RequestBuilder::new(self.listener, method, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// `/stats?format=json` as a map of stat name to value (counters and gauges).
    pub fn stats(&self) -> std::collections::BTreeMap<String, u64> {
        let (_, body) = admin_get(self.admin, "/stats?format=json").expect("admin /stats");
        let json: Value = serde_json::from_str(&body).expect("stats JSON");
        let mut stats = std::collections::BTreeMap::new();
        for stat in json["stats"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) = (stat["name"].as_str(), stat["value"].as_u64()) {
                stats.insert(name.to_string(), value);
            }
        }
        stats
    }

    /// One stat's value (0 when absent). Custom Wasm metrics carry the
    /// `wasmcustom.` prefix in Envoy.
    pub fn stat(&self, name: &str) -> u64 {
        self.stats().get(name).copied().unwrap_or(0)
    }

    /// `/stats/prometheus` text.
    pub fn prometheus(&self) -> String {
        admin_get(self.admin, "/stats/prometheus").expect("admin /stats/prometheus").1
    }

    /// Any admin endpoint, e.g. `/memory`.
    pub fn admin(&self, path: &str) -> (u16, String) {
        admin_get(self.admin, path).expect("admin request")
    }
}

impl Envoy {
    /// For an Envoy shared by several tests (never dropped): keep the returned
    /// guard alive in each test and the log is printed if that test fails.
    pub fn log_on_failure(&self) -> LogOnFailure<'_> {
        LogOnFailure(self)
    }

    fn print_log(&self) {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(200).collect();
        eprintln!("---- Envoy log ({}), last {} lines ----", self.dir.display(), tail.len());
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        eprintln!("---- end of Envoy log ----");
    }
}

pub struct LogOnFailure<'a>(&'a Envoy);

impl Drop for LogOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.print_log();
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            self.print_log();
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A blocking GET to the admin port (plain HTTP/1.1 over a socket: the admin
/// must be readable even when the runtime is busy).
pub fn admin_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let response = crate::client::Response::from_http1(&raw)?;
    Some((response.status, response.text()))
}

fn first_listener(admin: SocketAddr) -> Option<SocketAddr> {
    let (_, body) = admin_get(admin, "/listeners?format=json")?;
    let json: Value = serde_json::from_str(&body).ok()?;
    let socket = &json["listener_statuses"][0]["local_address"]["socket_address"];
    let ip = socket["address"].as_str()?;
    let port = socket["port_value"].as_u64()?;
    format!("{ip}:{port}").parse().ok()
}
