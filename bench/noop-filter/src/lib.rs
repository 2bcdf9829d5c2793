//! An HTTP filter that does nothing: `make bench` loads it to measure what the
//! Wasm boundary alone costs (VM dispatch of the request and response callbacks).
//!
//! Configured with a number (`"1024"`), it answers every request itself with a
//! `200` of that many bytes: the floor of any module that answers from Wasm (one
//! request callback, one local reply), against which cache hits are compared.
//!
//! Configured with `"trap"`, a request carrying `x-trap` traps the VM (what a
//! panic does): the integration tests measure Envoy's `failure_policy` with it.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot { reply: None, trap: false }) });
}}

struct NoopRoot {
    reply: Option<Rc<Vec<u8>>>,
    trap: bool,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let configured = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&configured);
        let text = text.trim().trim_matches('"');
        self.reply = text.parse::<usize>().ok().map(|bytes| Rc::new(vec![b'x'; bytes]));
        self.trap = text == "trap";
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopStream { reply: self.reply.clone(), trap: self.trap }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct NoopStream {
    reply: Option<Rc<Vec<u8>>>,
    trap: bool,
}

impl Context for NoopStream {}

impl HttpContext for NoopStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.trap && self.get_http_request_header_bytes("x-trap").is_some() {
            trap();
        }
        let Some(body) = &self.reply else { return Action::Continue };
        let headers = [("content-type", "text/plain"), ("cache-control", "public, max-age=600")];
        match proxy_wasm::hostcalls::send_http_response(200, headers.to_vec(), Some(body)) {
            Ok(()) => Action::Pause,
            Err(_) => Action::Continue,
        }
    }
}

/// Traps the VM, as a panic in a module does.
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort()
}
