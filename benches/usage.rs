//! The streamed path's cost per chunk: what latchkey does with each event-stream chunk
//! of a token-priced answer (scan it for usage, pass it on), and reading the final usage.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use latchkey::dataplane::usage::Meter;
use latchkey::policy::Vendor;

/// One content chunk as OpenAI streams it (about 230 bytes).
const CHUNK: &str = "data: {\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":1733000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" token\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n";

const LAST: &str = "data: {\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":1000,\"completion_tokens\":500,\"total_tokens\":1500,\"prompt_tokens_details\":{\"cached_tokens\":200}}}\n\ndata: [DONE]\n\n";

fn usage(c: &mut Criterion) {
    let mut group = c.benchmark_group("streamed_usage");
    group.throughput(Throughput::Elements(1));
    group.bench_function("content_chunk", |b| {
        let mut meter = Meter::for_content_type(Vendor::OpenAi, b"text/event-stream").unwrap();
        b.iter(|| meter.feed(black_box(CHUNK.as_bytes())))
    });
    group.bench_function("usage_chunk_and_finish", |b| {
        b.iter(|| {
            let mut meter = Meter::for_content_type(Vendor::OpenAi, b"text/event-stream").unwrap();
            meter.feed(black_box(LAST.as_bytes()));
            meter.finish().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, usage);
criterion_main!(benches);
