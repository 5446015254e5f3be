//! Every input kept in the fuzz corpus (fuzz/corpus/TARGET) and every crash
//! reproducer (fuzz/artifacts/TARGET), replayed through the checks its
//! target makes (`tofy::fuzzing`): what once broke stays fixed. `make fuzz`
//! grows the corpus; this runs in CI on stable.

use std::path::Path;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 5] = [
    ("chat_request", tofy::fuzzing::chat_request),
    ("prompt_embeds", tofy::fuzzing::prompt_embeds),
    ("world_tokenizer", tofy::fuzzing::world_tokenizer),
    ("vocab", tofy::fuzzing::vocab),
    ("checkpoint", tofy::fuzzing::checkpoint),
];

#[test]
fn the_kept_corpus_and_reproducers_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, check) in TARGETS {
        let mut inputs = 0;
        for dir in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| check(&data));
                assert!(outcome.is_ok(), "{target}: {} fails", path.display());
                inputs += 1;
            }
        }
        assert!(inputs > 0, "{target}: no corpus in fuzz/corpus/{target}");
    }
}
