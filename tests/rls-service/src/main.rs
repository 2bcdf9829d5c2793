//! A test fixture: Envoy's rate-limit service (`envoy.service.ratelimit.v3.
//! RateLimitService/ShouldRateLimit`) answered by Kuadrant's Limitador engine
//! with its Redis storage. The engine and Redis do the counting; this file only
//! translates the protocol, so several Envoys sharing one Redis share limits the
//! way they would with a production rate-limit service.
//!
//! ```text
//! rls-service --listen 127.0.0.1:0 --redis redis://127.0.0.1:6379 --limits limits.json
//!             [--delay-ms 200] [--answer garbage]
//! ```
//! `limits.json` is a list of Limitador limits in Limitador's own format
//! (`namespace`, `max_value`, `seconds`, `conditions`, `variables`, `name`). The
//! request's `domain` is the namespace. Each descriptor of a request is checked on
//! its own, bound as `descriptors[0]` (a map of its entries), so a status can be
//! reported per descriptor, as envoyproxy/ratelimit does. Checks run one at a
//! time (see `Service::serial`). It prints
//! `listening on <addr>` once it accepts connections.
//!
//! `--delay-ms` answers late (a slow service); `--answer garbage` answers every
//! call with a well-framed gRPC message that is not a `RateLimitResponse`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use limitador::limit::{Context, Limit, Namespace};
use limitador::storage::redis::AsyncRedisStorage;
use limitador::AsyncRateLimiter;
use tonic::{Request, Response, Status};

struct Service {
    limiter: AsyncRateLimiter,
    delay: Duration,
    /// Limitador's Redis storage reads the counters, decides, then increments
    /// (two round trips): concurrent checks in one service can admit more than
    /// the limit. One check at a time makes this service exact, so the tests
    /// measure the module, not that race.
    serial: tokio::sync::Mutex<()>,
}

/// The RLS unit of a Limitador window; other windows are refused at start.
fn unit_of(seconds: u64) -> Option<Unit> {
    match seconds {
        1 => Some(Unit::Second),
        60 => Some(Unit::Minute),
        3600 => Some(Unit::Hour),
        86_400 => Some(Unit::Day),
        604_800 => Some(Unit::Week),
        _ => None,
    }
}

impl Service {
    async fn status_of(
        &self,
        namespace: &Namespace,
        entries: HashMap<String, String>,
        hits: u64,
    ) -> Result<DescriptorStatus, Status> {
        let mut context = Context::default();
        context.list_binding("descriptors".to_string(), vec![entries]);
        let result = self
            .limiter
            .check_rate_limited_and_update(namespace, &context, hits)
            .await
            .map_err(|error| Status::unavailable(format!("limitador: {error}")))?;
        let code = if result.limited { Code::OverLimit } else { Code::Ok };
        // The most restrictive counter speaks for the descriptor.
        let tightest = result.counters.iter().min_by_key(|counter| counter.remaining().unwrap_or(counter.max_value()));
        let Some(counter) = tightest else {
            return Ok(DescriptorStatus { code: code.into(), ..Default::default() });
        };
        let unit = unit_of(counter.limit().seconds()).unwrap_or(Unit::Unknown);
        let reset = counter.expires_in().unwrap_or(counter.window());
        Ok(DescriptorStatus {
            code: code.into(),
            current_limit: Some(RateLimit {
                name: counter.limit().name().unwrap_or_default().to_string(),
                requests_per_unit: u32::try_from(counter.max_value()).unwrap_or(u32::MAX),
                unit: unit.into(),
            }),
            limit_remaining: u32::try_from(counter.remaining().unwrap_or(counter.max_value())).unwrap_or(u32::MAX),
            duration_until_reset: Some(ProtoDuration {
                seconds: i64::try_from(reset.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(reset.subsec_nanos()).unwrap_or(0),
            }),
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let request = request.into_inner();
        let namespace = Namespace::from(request.domain.as_str());
        // The protocol: 0 means 1.
        let hits = u64::from(request.hits_addend.max(1));
        let mut statuses = Vec::new();
        let _one_at_a_time = self.serial.lock().await;
        for descriptor in request.descriptors {
            // A descriptor's own hits_addend overrides the request's.
            let hits = descriptor.hits_addend.map_or(hits, |own| own.value);
            let entries = descriptor.entries.into_iter().map(|entry| (entry.key, entry.value)).collect();
            statuses.push(self.status_of(&namespace, entries, hits).await?);
        }
        let over = statuses.iter().any(|status| status.code == i32::from(Code::OverLimit));
        let overall_code = if over { Code::OverLimit } else { Code::Ok };
        Ok(Response::new(RateLimitResponse { overall_code: overall_code.into(), statuses, ..Default::default() }))
    }
}

/// `--answer garbage`: HTTP/2 answers shaped like gRPC (content type, one
/// length-prefixed message, `grpc-status: 0`) whose message is not a protobuf.
async fn serve_garbage(listener: tokio::net::TcpListener) {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request| async {
                let mut frame = vec![0u8];
                let message = [0xffu8, 0xff, 0xff, 0x07, 0x0a];
                frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
                frame.extend_from_slice(&message);
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let frames: Vec<Result<Frame<bytes::Bytes>, Infallible>> =
                    vec![Ok(Frame::data(bytes::Bytes::from(frame))), Ok(Frame::trailers(trailers))];
                let body = StreamBody::new(tokio_stream::iter(frames)).boxed();
                let response =
                    hyper::Response::builder().header("content-type", "application/grpc").body(body).unwrap();
                Ok::<_, Infallible>(response)
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn argument(arguments: &[String], name: &str) -> Option<String> {
    arguments.iter().position(|argument| argument == name).and_then(|index| arguments.get(index + 1)).cloned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arguments: Vec<String> = std::env::args().collect();
    let listen = argument(&arguments, "--listen").unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind --listen");
    let address = listener.local_addr().expect("local address");
    if argument(&arguments, "--answer").as_deref() == Some("garbage") {
        println!("listening on {address}");
        serve_garbage(listener).await;
        return;
    }
    let redis = argument(&arguments, "--redis").expect("--redis redis://host:port");
    let limits_path = argument(&arguments, "--limits").expect("--limits file.json");
    let delay =
        Duration::from_millis(argument(&arguments, "--delay-ms").map_or(0, |ms| ms.parse().expect("--delay-ms")));
    let limits: Vec<Limit> =
        serde_json::from_slice(&std::fs::read(&limits_path).expect("read --limits")).expect("Limitador limits JSON");
    let storage = AsyncRedisStorage::new(&redis).await.expect("connect to Redis");
    let limiter = AsyncRateLimiter::new_with_storage(Box::new(storage));
    for limit in limits {
        assert!(unit_of(limit.seconds()).is_some(), "a window of {} s has no RLS unit", limit.seconds());
        limiter.add_limit(limit);
    }
    let service = Arc::new(Service { limiter, delay, serial: tokio::sync::Mutex::new(()) });
    println!("listening on {address}");
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::from_arc(service))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .expect("serve");
}
