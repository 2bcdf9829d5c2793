//! The root context every filter shares. A filter describes itself as a
//! [`Module`]: how to compile its configuration, build its per-VM state and open
//! a stream, and, if it needs them, what its root does on a tick and when an HTTP
//! call the root started is answered. [`ModuleRoot`] does the rest once for all:
//! configuration loading (one log line per problem, the config refused), the
//! instance name for metrics, the tick period, and the registry of the root's
//! HTTP calls in flight (token -> what to continue with).

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use serde::de::DeserializeOwned;

use crate::config::{load_plugin_config, ConfigErrors};
use crate::host;
use crate::metrics::stat_segment;
use crate::platform::Ffi;

/// One filter module, as the shared root sees it.
pub trait Module: 'static {
    /// The module name: log prefix, metric prefix, default instance name.
    const NAME: &'static str;
    /// The configuration as users write it.
    type Config: DeserializeOwned;
    /// The validated, compiled configuration.
    type Compiled;
    /// Per-VM state shared by the root and every stream of this VM.
    type Shared: 'static;
    /// What the root continues with when an HTTP call it started is answered.
    type RootCall: 'static;

    fn compile(config: &Self::Config) -> Result<Self::Compiled, ConfigErrors>;

    /// Builds the per-VM state; `None` refuses the configuration (log why first).
    /// `instance` is the filter's name in the host config (Envoy: the `name` of the
    /// Wasm config), a stat-safe segment, for modules that run twice in a chain.
    fn start(host: &Ffi, compiled: Self::Compiled, instance: &str) -> Option<Self::Shared>;

    /// A new stream context for one request (`context_id`: the host's id of it).
    fn stream(shared: &Rc<Self::Shared>, context_id: u32) -> Box<dyn HttpContext>;

    /// How often the root's [`Module::on_tick`] runs; `None`: never.
    fn tick_period(_shared: &Self::Shared) -> Option<Duration> {
        None
    }

    /// Periodic work of the root; HTTP calls it starts go into `calls`.
    fn on_tick(_shared: &Rc<Self::Shared>, _calls: &mut RootCalls<Self::RootCall>) {}

    /// An HTTP call the root started was answered (or failed: no headers).
    fn on_call_response(_shared: &Rc<Self::Shared>, _call: Self::RootCall, _body_size: usize) {}
}

/// The prefix of a module instance's metric names: the module name for the
/// instance named after it (`auth.allowed`), `<module>.<instance>` for any other
/// (`auth.internal-api.allowed`), so two instances in one Envoy never merge their
/// counters. (ratelimit always includes the instance: `ratelimit.<instance>.*`.)
pub fn metric_prefix(module: &str, instance: &str) -> String {
    if instance == module {
        module.to_string()
    } else {
        format!("{module}.{instance}")
    }
}

/// The root's HTTP calls in flight, by token.
pub struct RootCalls<C> {
    in_flight: HashMap<u32, C>,
    root_context_id: u32,
}

impl<C> Default for RootCalls<C> {
    fn default() -> Self {
        Self { in_flight: HashMap::new(), root_context_id: 0 }
    }
}

impl<C> RootCalls<C> {
    /// The host's id of the root context (to set back after acting on a stream).
    pub fn root_context_id(&self) -> u32 {
        self.root_context_id
    }

    pub fn insert(&mut self, token: u32, call: C) {
        self.in_flight.insert(token, call);
    }

    pub fn take(&mut self, token: u32) -> Option<C> {
        self.in_flight.remove(&token)
    }

    pub fn pending(&self) -> impl Iterator<Item = &C> {
        self.in_flight.values()
    }
}

/// The root context of every filter module.
pub struct ModuleRoot<M: Module> {
    shared: Option<Rc<M::Shared>>,
    calls: RootCalls<M::RootCall>,
}

impl<M: Module> Default for ModuleRoot<M> {
    fn default() -> Self {
        Self { shared: None, calls: RootCalls::default() }
    }
}

/// Registers `M` as the module of this VM (call from `proxy_wasm::main!`).
pub fn install<M: Module>() {
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        let mut root = ModuleRoot::<M>::default();
        root.calls.root_context_id = context_id;
        Box::new(root)
    });
}

impl<M: Module> Context for ModuleRoot<M> {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        if let (Some(call), Some(shared)) = (self.calls.take(token_id), self.shared.as_ref()) {
            M::on_call_response(shared, call, body_size);
        }
    }
}

impl<M: Module> RootContext for ModuleRoot<M> {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(compiled) = load_plugin_config(M::NAME, M::compile) else {
            return false;
        };
        let instance = host::property(&["plugin_name"])
            .ok()
            .flatten()
            .map(|name| stat_segment(&String::from_utf8_lossy(&name)))
            .unwrap_or_else(|| M::NAME.to_string());
        let Some(shared) = M::start(&Ffi, compiled, &instance) else {
            return false;
        };
        if let Some(period) = M::tick_period(&shared) {
            let _ = host::set_tick_period(period);
        }
        self.shared = Some(Rc::new(shared));
        true
    }

    fn on_tick(&mut self) {
        if let Some(shared) = self.shared.clone() {
            M::on_tick(&shared, &mut self.calls);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(M::stream(self.shared.as_ref()?, context_id))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Declares the callbacks of one HTTP stream the module handles, from
/// `request_headers`, `request_body`, `request_trailers`, `response_headers`,
/// `response_body`, `response_trailers`, `log` and `done`; name each one the module's
/// stream context implements. The build (`scripts/trim_callbacks.py`) exports only
/// these: a host calls every callback a module exports, and the SDK exports them all,
/// so each one left undeclared saves a call into the VM per request (per body chunk
/// for the body callbacks).
#[macro_export]
macro_rules! stream_callbacks {
    ($($callback:ident),+ $(,)?) => {
        const _: () = {
            const NAMES: &str = concat!($(stringify!($callback), "\n"),+);
            #[cfg(target_family = "wasm")]
            #[link_section = "gateway.stream_callbacks"]
            #[used]
            static STREAM_CALLBACKS: [u8; NAMES.len()] = match NAMES.as_bytes().first_chunk() {
                Some(bytes) => *bytes,
                None => [0; NAMES.len()],
            };
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_other_than_the_default_get_their_own_metric_prefix() {
        assert_eq!(metric_prefix("auth", "auth"), "auth");
        assert_eq!(metric_prefix("auth", "internal-api"), "auth.internal-api");
    }
}
