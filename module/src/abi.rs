//! Envoy 1.40's dynamic-module ABI (`v0.2.0`), the part this module uses: the types and
//! the callbacks Envoy exports, declared by hand from the ABI's documented C signatures.
//! Enums cross as their C `int` values.

use std::ffi::c_void;

pub const ABI_VERSION: &std::ffi::CStr = c"v0.2.0";

/// A buffer Envoy owns, valid for the hook it was given in.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

/// A buffer the module owns, read by Envoy during the call it is passed to.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHeader {
    pub key: EnvoyBuffer,
    pub value: EnvoyBuffer,
}

#[repr(C)]
pub struct ModuleHeader {
    pub key: ModuleBuffer,
    pub value: ModuleBuffer,
}

pub type FilterEnvoy = *mut c_void;
pub type FilterModule = *const c_void;
pub type ConfigEnvoy = *mut c_void;
pub type ConfigModule = *const c_void;

// `envoy_dynamic_module_type_http_header_type`
pub const REQUEST_HEADERS: u32 = 0;
pub const RESPONSE_HEADERS: u32 = 2;

// `envoy_dynamic_module_type_attribute_id`
pub const ATTRIBUTE_REQUEST_SIZE: u32 = 13;
pub const ATTRIBUTE_RESPONSE_CODE: u32 = 15;
pub const ATTRIBUTE_RESPONSE_CODE_DETAILS: u32 = 16;
pub const ATTRIBUTE_RESPONSE_SIZE: u32 = 21;

// Every `on_http_filter_*_status` enum: `Continue` is 0, `StopIteration` 1.
pub const CONTINUE: u32 = 0;
pub const STOP_ITERATION: u32 = 1;

// `envoy_dynamic_module_type_log_level`
pub const LOG_INFO: u32 = 2;
pub const LOG_ERROR: u32 = 4;

unsafe extern "C" {
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    pub fn envoy_dynamic_module_callback_is_validation_mode() -> bool;
    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: FilterEnvoy,
        header_type: u32,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter: FilterEnvoy,
        header_type: u32,
        result: *mut EnvoyHeader,
    ) -> bool;
    /// A null `value` removes the header.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoy,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    /// Adds a value, keeping any the map has; an empty `value` adds nothing.
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter: FilterEnvoy,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterEnvoy,
        status: u32,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        filter: FilterEnvoy,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        value: ModuleBuffer,
    );
    pub fn envoy_dynamic_module_callback_http_clear_route_cache(filter: FilterEnvoy);
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: FilterEnvoy,
        attribute: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: FilterEnvoy,
        attribute: u32,
        result: *mut u64,
    ) -> bool;
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            length: bytes.len(),
        }
    }

    pub const NULL: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };
}

impl EnvoyBuffer {
    /// The bytes, for as long as the hook that was given them runs.
    ///
    /// # Safety
    /// `ptr` points at `length` readable bytes that outlive `'a`.
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            return &[];
        }
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr, self.length) }
    }
}
