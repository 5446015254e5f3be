//! World-model forward pass on the CPU at the seed's size (dim 368, max_seq
//! 128, 4 layers, 8 heads, bridge 256) with a 10k vocab: batch 1 and 8, one
//! thread and every core; with `--features train`, candle's forward pass on
//! the same checkpoint in the same run (every core, its default).
//! Figures go to BENCHMARKS.md.

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tofy::world::{LoadOptions, WorldConfig, WorldModel, default_threads};

const SEED_SIZE: WorldConfig = WorldConfig {
    dim: 368,
    num_layers: 4,
    num_heads: 8,
    max_seq: 128,
    vocab_size: 10_000,
    bridge_dim: 256,
};

/// A typical chat prompt: 22 tokens.
const PROMPT: &str = "I have a small budget and want to train language models at home, which gpu should I buy and why?";

fn forward(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let w = common::write_checkpoint(dir.path(), &SEED_SIZE, 1, true);
    let mut group = c.benchmark_group("world_forward_368x128x4x8x256_v10k");
    group.sample_size(30);
    let all = default_threads();
    for threads in [1, all] {
        let options = LoadOptions {
            threads: Some(threads),
            ..Default::default()
        };
        let model = WorldModel::load(&w.model, &w.vocab, &options).unwrap();
        for batch in [1usize, 8] {
            let prompts = vec![PROMPT; batch];
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("threads{threads}"), format!("batch{batch}")),
                &prompts,
                |b, p| b.iter(|| model.condition_batch(p).unwrap()),
            );
        }
    }
    #[cfg(feature = "train")]
    candle(&mut group, &w.model);
    group.finish();
}

/// candle on the same checkpoint: tokenization and padding as in
/// `WorldModel::condition_batch`, so both sides do the same work.
#[cfg(feature = "train")]
fn candle(
    group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    path: &std::path::Path,
) {
    use candle_core::Device;
    use tofy::train::model::{load_checkpoint, pad_ids};
    use tofy::world::{Vocab, encode};

    let model = load_checkpoint(path, &SEED_SIZE).unwrap();
    let vocab = Vocab::load(path.with_file_name("vocab_world.txt")).unwrap();
    for batch in [1usize, 8] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("candle", format!("batch{batch}")), |b| {
            b.iter(|| {
                let encoded: Vec<_> = (0..batch)
                    .map(|_| encode(&vocab, PROMPT, SEED_SIZE.max_seq).unwrap())
                    .collect();
                let ids: Vec<&[u32]> = encoded.iter().map(|e| e.ids.as_slice()).collect();
                let lens: Vec<usize> = ids.iter().map(|i| i.len()).collect();
                let tensor = pad_ids(&ids, SEED_SIZE.max_seq, &Device::Cpu).unwrap();
                model
                    .forward(&tensor, &lens)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
            })
        });
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
