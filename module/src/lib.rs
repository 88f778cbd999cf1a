//! latchkey's data plane as an Envoy dynamic module (`envoy/envoy-inprocess.yaml`).
//!
//! This crate is the FFI and nothing else: the hooks Envoy calls, each behind an unwind
//! barrier (a panic must never cross into Envoy), turning Envoy's buffers into slices and
//! the engine's verdicts into Envoy calls. What a request comes to is decided by
//! `latchkey::envoy::module::engine`, in safe code, from the policy `latchkey serve`
//! pushes over its Unix socket.
//!
//! Every request the module passes on is marked in the dynamic metadata
//! (`latchkey.in_process`). One it cannot decide alone (a body to read, a response to
//! price, a token to fetch: `Policy::in_process`) is marked `no`, for which alone Envoy
//! makes the ext_proc filter after it. One it decided is marked with its target's
//! cluster, which routes it there and keeps it out of the gRPC access log; its
//! rate-limit and budget figures go on the response from here, not through the metadata
//! and the route's formatters (11,000 fewer instructions per request in Envoy, of the
//! 123,000 the mode added).

#![allow(clippy::missing_safety_doc)]

mod abi;

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use abi::*;
use latchkey::envoy::convert::header_text;
use latchkey::envoy::module::engine::{Engine, Pending, Request, Verdict};
use latchkey::envoy::module::wire::Ending;

/// The filter's config: `{"socket": "<path of latchkey serve's module socket>", "mark":
/// "cluster", "hand_on": "metadata"}`. `mark` says the routes match the cluster this
/// module names in its mark (`latchkey.in_process`), `hand_on` that the composite filter
/// makes ext_proc on the mark `no`: a config written for a module that marked otherwise
/// would answer every decided (or every handed-on) request 500, so it is refused at load
/// instead.
struct Config {
    socket: PathBuf,
}

/// One request's state.
#[derive(Default)]
struct Filter {
    pending: Option<Pending>,
    /// The figures a forwarded request's response shows (`Shown::headers`).
    shown: Vec<(&'static str, String)>,
}

fn log(error: bool, message: &str) {
    let level = if error { LOG_ERROR } else { LOG_INFO };
    let message = format!("latchkey: {message}");
    // SAFETY: the buffer outlives the call; Envoy copies it.
    unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

/// Runs a hook, turning a panic into `fallback` rather than unwinding into Envoy.
fn barrier<T>(hook: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        log(true, &format!("{hook} panicked"));
        fallback
    })
}

/// Records still queued when Envoy exits are sent before it goes.
extern "C" fn flush_at_exit() {
    let _ = catch_unwind(|| {
        let left = Engine::global().drain(Duration::from_secs(3));
        let (decided, sent, dropped) = Engine::global().counts();
        if decided == 0 {
            return;
        }
        let message = format!(
            "exiting: {decided} requests decided in process, {sent} recorded with latchkey serve, {dropped} dropped, {left} unsent"
        );
        eprintln!("latchkey module: {message}");
    });
}

unsafe extern "C" {
    fn atexit(callback: extern "C" fn()) -> i32;
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    barrier("program_init", std::ptr::null(), || {
        if let Some(why) = latchkey::envoy::module::pin::mismatch(Path::new("/proc/self/exe")) {
            eprintln!("latchkey module: refusing to load: {why}");
            log(true, &format!("refusing to load: {why}"));
            return std::ptr::null();
        }
        // SAFETY: registers a plain function, which never unwinds out.
        unsafe { atexit(flush_at_exit) };
        ABI_VERSION.as_ptr()
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: ConfigEnvoy,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ConfigModule {
    barrier("config_new", std::ptr::null(), || {
        // SAFETY: Envoy's buffer, valid during this hook.
        let text = unsafe { config.bytes() };
        let config = serde_json::from_slice::<serde_json::Value>(text).ok();
        let socket = (config.as_ref()).and_then(|v| v.get("socket")?.as_str().map(PathBuf::from));
        let field = |key| config.as_ref().and_then(|v| v.get(key)?.as_str());
        let (Some(socket), Some("cluster"), Some("metadata")) =
            (socket, field("mark"), field("hand_on"))
        else {
            log(
                true,
                r#"the filter config must be {"socket": "<path>", "mark": "cluster", "hand_on": "metadata"}, with routes that match the cluster in latchkey.in_process and a composite filter that makes ext_proc when it is "no" (envoy-inprocess.yaml of this release)"#,
            );
            return std::ptr::null();
        };
        // `envoy --mode validate` builds the config too: no threads, no sockets then.
        // SAFETY: called on the main thread, as config hooks are.
        if !unsafe { envoy_dynamic_module_callback_is_validation_mode() } {
            Engine::global().connect(socket.clone(), log);
        }
        Box::into_raw(Box::new(Config { socket })) as ConfigModule
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ConfigModule) {
    barrier("config_destroy", (), || {
        if config.is_null() {
            return;
        }
        // SAFETY: made by `config_new` with `Box::into_raw`, destroyed once.
        let config = unsafe { Box::from_raw(config as *mut Config) };
        drop(config.socket);
    })
}

/// Per-route configs are not supported: a route that sets one is refused.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    log(true, "per-route configs are not supported");
    std::ptr::null()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_: *const c_void) {}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: ConfigModule,
    _filter_envoy: FilterEnvoy,
) -> FilterModule {
    barrier("filter_new", std::ptr::null(), || {
        Box::into_raw(Box::<Filter>::default()) as FilterModule
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: FilterModule) {
    barrier("filter_destroy", (), || {
        if filter.is_null() {
            return;
        }
        // SAFETY: made by `filter_new` with `Box::into_raw`, destroyed once.
        drop(unsafe { Box::from_raw(filter as *mut Filter) });
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: FilterEnvoy,
    filter: FilterModule,
    end_of_stream: bool,
) -> u32 {
    let decided = barrier("request_headers", None, || {
        // Null if `filter_new` failed: then the request is refused below.
        let filter = filter as *mut Filter;
        if filter.is_null() {
            return None;
        }
        // SAFETY: `envoy` is this stream's filter, alive during the hook.
        let (verdict, pending) = unsafe { judge(envoy, end_of_stream) };
        // SAFETY: Envoy hands the filter it made in `filter_new`, one hook at a time. No
        // borrow of it is held while Envoy is called, nor is it touched after a denial's
        // reply: whether Envoy runs the reply, and this filter's other hooks and its
        // destruction, within that call or after this hook is Envoy's to choose.
        unsafe { (*filter).pending = pending };
        // SAFETY: as above; the header slices `judge` read are no longer held.
        let (status, shown) = unsafe { apply(envoy, verdict) };
        if !shown.is_empty() {
            // SAFETY: as above: only a forwarded request shows figures, and forwarding
            // replies nothing.
            unsafe { (*filter).shown = shown };
        }
        Some(status)
    });
    decided.unwrap_or_else(|| {
        // Fail closed: a request the module could not judge does not go upstream.
        let body =
            br#"{"error":{"type":"internal","message":"latchkey could not judge the request"}}"#;
        // SAFETY: `envoy` is alive during the hook; the buffers outlive the call.
        unsafe { reply(envoy, 500, &[("content-type", "application/json")], body) };
        STOP_ITERATION
    })
}

/// The request's headers read from Envoy and judged.
unsafe fn judge(envoy: FilterEnvoy, end_of_stream: bool) -> (Verdict, Option<Pending>) {
    // SAFETY: the caller's.
    let raw = unsafe { headers(envoy, REQUEST_HEADERS) };
    // Envoy validates header names (tokens, lower case), so they are ASCII; a name that
    // were not would be dropped, never guessed at. (Checked as ASCII rather than as
    // UTF-8: a tenth of the cost, on every header of every request.)
    let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(raw.len());
    headers.extend(raw.iter().filter_map(|h| {
        // SAFETY: Envoy's buffers, valid until this hook sets a header.
        let (name, value) = unsafe { (h.key.bytes(), h.value.bytes()) };
        // SAFETY: ASCII is UTF-8.
        let name = name
            .is_ascii()
            .then(|| unsafe { std::str::from_utf8_unchecked(name) })?;
        Some((name, value))
    }));
    let request = Request {
        method: header_text(&headers, ":method"),
        path: header_text(&headers, ":path"),
        headers: &headers,
        has_body: !end_of_stream,
    };
    Engine::global().judge(&request, latchkey::base::clock::now_unix_ms())
}

/// The headers of `which` map, as Envoy's buffers: valid until the hook changes the map.
unsafe fn headers(envoy: FilterEnvoy, which: u32) -> Vec<EnvoyHeader> {
    const NONE: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };
    // SAFETY: `envoy` is alive during the hook; the array is sized as Envoy says and
    // filled by it.
    unsafe {
        let size = envoy_dynamic_module_callback_http_get_headers_size(envoy, which);
        let mut raw = vec![
            EnvoyHeader {
                key: NONE,
                value: NONE
            };
            size
        ];
        if size > 0
            && !envoy_dynamic_module_callback_http_get_headers(envoy, which, raw.as_mut_ptr())
        {
            raw.clear();
        }
        raw
    }
}

/// Envoy told what the verdict says; with what the response is to show (`Filter::shown`).
unsafe fn apply(envoy: FilterEnvoy, verdict: Verdict) -> (u32, Vec<(&'static str, String)>) {
    match verdict {
        Verdict::HandOn => {
            // The composite filter next in the chain makes the ext_proc filter for this
            // request alone; whatever `latchkey serve` allows it marks for the route. (A
            // mark in the metadata, not a header: the filter reads it on every request,
            // and finding a header that is not one of Envoy's own costs 3,300
            // instructions more.)
            // SAFETY: `envoy` is alive; the buffers outlive the call.
            unsafe { mark(envoy, b"no") };
            (CONTINUE, Vec::new())
        }
        Verdict::Forward { mut forward, shown } => {
            // The route picks the cluster from the mark: no header to set and remove.
            // Without one (never so), the mark matches no route and the request is
            // refused there.
            let cluster = forward.take_cluster();
            // SAFETY: `envoy` is alive; every buffer outlives its call.
            unsafe {
                mark(envoy, cluster.as_deref().unwrap_or(b"none"));
                for name in forward.removals() {
                    set_header(envoy, REQUEST_HEADERS, name.as_bytes(), None);
                }
                for (name, value) in &forward.set {
                    set_header(envoy, REQUEST_HEADERS, name.as_bytes(), Some(value));
                }
                // The authority changed, and so did the metadata the route matches on.
                envoy_dynamic_module_callback_http_clear_route_cache(envoy);
            }
            (CONTINUE, shown.headers())
        }
        Verdict::Deny {
            status,
            headers,
            body,
        } => {
            // SAFETY: as above.
            unsafe {
                mark(envoy, b"denied");
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                reply(envoy, status, &headers, &body);
            }
            (STOP_ITERATION, Vec::new())
        }
    }
}

/// Marks the request `latchkey.in_process` in the dynamic metadata: with its target's
/// cluster if decided here (the route sends it there, the access log passes it by),
/// `denied` (which routes nowhere), or `no` if handed on (the composite filter makes
/// ext_proc for it, the access log keeps it).
unsafe fn mark(envoy: FilterEnvoy, value: &[u8]) {
    // SAFETY: the caller's; the buffers outlive the call.
    unsafe {
        envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
            envoy,
            ModuleBuffer::of(b"latchkey"),
            ModuleBuffer::of(b"in_process"),
            ModuleBuffer::of(value),
        )
    }
}

/// Sets (replacing every value) or, with `None`, removes a header of `which` map.
unsafe fn set_header(envoy: FilterEnvoy, which: u32, name: &[u8], value: Option<&[u8]>) {
    let value = value.map_or(ModuleBuffer::NULL, ModuleBuffer::of);
    // SAFETY: the caller's; the buffers outlive the call.
    unsafe {
        envoy_dynamic_module_callback_http_set_header(envoy, which, ModuleBuffer::of(name), value)
    };
}

unsafe fn reply(envoy: FilterEnvoy, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let mut headers: Vec<ModuleHeader> = headers
        .iter()
        .map(|(k, v)| ModuleHeader {
            key: ModuleBuffer::of(k.as_bytes()),
            value: ModuleBuffer::of(v.as_bytes()),
        })
        .collect();
    // SAFETY: the caller's; the header array and body outlive the call.
    unsafe {
        envoy_dynamic_module_callback_http_send_response(
            envoy,
            u32::from(status),
            headers.as_mut_ptr(),
            headers.len(),
            ModuleBuffer::of(body),
            ModuleBuffer::of(b"latchkey_denied"),
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: FilterEnvoy,
    filter: FilterModule,
) {
    barrier("stream_complete", (), || {
        // SAFETY: as in `request_headers`.
        let Some(filter) = (unsafe { (filter as *mut Filter).as_mut() }) else {
            return;
        };
        let Some(pending) = filter.pending.take() else {
            return;
        };
        let int = |attribute| {
            let mut value = 0u64;
            // SAFETY: `envoy` is alive during the hook; `value` outlives the call.
            let found = unsafe {
                envoy_dynamic_module_callback_http_filter_get_attribute_int(
                    envoy, attribute, &mut value,
                )
            };
            found.then_some(value)
        };
        // A client that hung up before any response leaves no status.
        let status = int(ATTRIBUTE_RESPONSE_CODE)
            .and_then(|s| u32::try_from(s).ok())
            .filter(|s| *s > 0);
        let mut details = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        // SAFETY: `envoy` is alive during the hook; `details` outlives the call and is
        // read before the hook returns.
        let upstream = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                envoy,
                ATTRIBUTE_RESPONSE_CODE_DETAILS,
                &mut details,
            ) && details.bytes() == b"via_upstream"
        };
        let ending = Ending {
            status,
            upstream_status: status.filter(|_| upstream),
            latency_ms: None,
            bytes_in: int(ATTRIBUTE_REQUEST_SIZE).unwrap_or(0),
            bytes_out: int(ATTRIBUTE_RESPONSE_SIZE).unwrap_or(0),
        };
        Engine::global().ended(pending, ending);
    })
}

/// A forwarded request's response (the upstream's, or Envoy's own reply) shows its
/// rate-limit and budget figures, replacing any the upstream sent.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: FilterEnvoy,
    filter: FilterModule,
    _end_of_stream: bool,
) -> u32 {
    barrier("response_headers", CONTINUE, || {
        // SAFETY: as in `request_headers`.
        let Some(filter) = (unsafe { (filter as *mut Filter).as_mut() }) else {
            return CONTINUE;
        };
        if filter.shown.is_empty() {
            return CONTINUE;
        }
        // A header the upstream did not send is added, not set: setting makes Envoy
        // search its map for copies to replace. Reading the names and adding costs a
        // request 2,400 fewer instructions in all than setting both rate-limit headers.
        // SAFETY: `envoy` is alive during the hook; the names are read before the map
        // changes.
        let sent: Vec<bool> = unsafe {
            let raw = headers(envoy, RESPONSE_HEADERS);
            (filter.shown.iter())
                .map(|(name, _)| raw.iter().any(|h| h.key.bytes() == name.as_bytes()))
                .collect()
        };
        for ((name, value), sent) in std::mem::take(&mut filter.shown).into_iter().zip(sent) {
            let (name, value) = (name.as_bytes(), value.as_bytes());
            // SAFETY: `envoy` is alive during the hook; the buffers outlive the call.
            unsafe {
                if sent {
                    set_header(envoy, RESPONSE_HEADERS, name, Some(value));
                } else {
                    envoy_dynamic_module_callback_http_add_header(
                        envoy,
                        RESPONSE_HEADERS,
                        ModuleBuffer::of(name),
                        ModuleBuffer::of(value),
                    );
                }
            }
        }
        CONTINUE
    })
}

// The hooks below are part of the ABI Envoy requires of every module; this one has no
// use for them.

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _: FilterEnvoy,
    _: FilterModule,
    _: bool,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _: FilterEnvoy,
    _: FilterModule,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: FilterEnvoy,
    _: FilterModule,
    _: bool,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: FilterEnvoy,
    _: FilterModule,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: FilterEnvoy,
    _: FilterModule,
    _: u64,
    _: u32,
    _: *mut EnvoyHeader,
    _: usize,
    _: *mut EnvoyBuffer,
    _: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _: FilterEnvoy,
    _: FilterModule,
    _: u64,
    _: *mut EnvoyHeader,
    _: usize,
    _: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _: FilterEnvoy,
    _: FilterModule,
    _: u64,
    _: *const EnvoyBuffer,
    _: usize,
    _: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _: FilterEnvoy,
    _: FilterModule,
    _: u64,
    _: *mut EnvoyHeader,
    _: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _: FilterEnvoy,
    _: FilterModule,
    _: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _: FilterEnvoy,
    _: FilterModule,
    _: u64,
    _: u32,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _: FilterEnvoy,
    _: FilterModule,
    _: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _: ConfigEnvoy,
    _: ConfigModule,
    _: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _: ConfigEnvoy,
    _: ConfigModule,
    _: u64,
    _: u32,
    _: *mut EnvoyHeader,
    _: usize,
    _: *mut EnvoyBuffer,
    _: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _: ConfigEnvoy,
    _: ConfigModule,
    _: u64,
    _: *mut EnvoyHeader,
    _: usize,
    _: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _: ConfigEnvoy,
    _: ConfigModule,
    _: u64,
    _: *const EnvoyBuffer,
    _: usize,
    _: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _: ConfigEnvoy,
    _: ConfigModule,
    _: u64,
    _: *mut EnvoyHeader,
    _: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    _: ConfigEnvoy,
    _: ConfigModule,
    _: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    _: ConfigEnvoy,
    _: ConfigModule,
    _: u64,
    _: u32,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _: FilterEnvoy,
    _: FilterModule,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _: FilterEnvoy,
    _: FilterModule,
) {
}

/// Envoy's own local replies (a timeout, a reset upstream) are not changed here; for a
/// request the module forwarded, the response-headers hook still adds its rate-limit
/// and budget figures.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _: FilterEnvoy,
    _: FilterModule,
    _: u32,
    _: EnvoyBuffer,
    _: bool,
) -> u32 {
    CONTINUE
}
