//! Test support for the filter crates' unit tests (feature `testing`, enabled
//! only by their dev-dependencies; never part of a module).

use crate::request::RequestHeaders;

/// A request view from header pairs; `:path` defaults to `/`. Panics when the
/// target is refused: tests of refused targets build the view themselves.
pub fn request(pairs: &[(&str, &[u8])]) -> RequestHeaders {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect();
    if !pairs.iter().any(|(name, _)| name == b":path") {
        pairs.push((b":path".to_vec(), b"/".to_vec()));
    }
    match RequestHeaders::from_pairs(pairs) {
        Ok(request) => request,
        Err((reason, _)) => panic!("test request refused: {reason:?}"),
    }
}

/// [`request`] from text values.
pub fn request_text(pairs: &[(&str, &str)]) -> RequestHeaders {
    request(&pairs.iter().map(|(name, value)| (*name, value.as_bytes())).collect::<Vec<_>>())
}

/// A global allocator that counts, per thread, the allocations made through it:
/// a crate's tests install it (`#[global_allocator]`) to pin how many
/// allocations a hot path makes ([`allocations_during`]). Allocations cost the
/// same in kind in the Wasm build (its allocator is the same dlmalloc design).
pub struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[allow(unsafe_code)]
// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

/// How many allocations (and reallocations) this thread made while `work` ran;
/// counts only where [`CountingAllocator`] is the global allocator.
pub fn allocations_during<T>(work: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATIONS.with(std::cell::Cell::get);
    let result = work();
    (result, ALLOCATIONS.with(std::cell::Cell::get) - before)
}
