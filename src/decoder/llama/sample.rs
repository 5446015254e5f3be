//! Picking each token from a sequence's logits.
//!
//! llama.cpp's penalties sampler looks every vocabulary entry up in a hash
//! map on every token (49k lookups for SmolLM2), which measured 2% of a
//! server's CPU time with the seed's default repeat penalty. The penalties
//! only touch the tokens in their window (at most `PENALTY_LAST_N`), so they
//! are applied here to those entries alone, with llama.cpp's exact
//! arithmetic. Greedy picking is then an argmax over the logits; any other
//! sampling goes through llama.cpp's own chain (top-k, top-p, min-p,
//! temperature, the random draw).

use std::collections::{HashMap, VecDeque};

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;

use crate::decoder::Sampling;
use crate::decoder::config::PENALTY_LAST_N;

/// Repeat, frequency and presence penalties over the last
/// `PENALTY_LAST_N` tokens (the end of the prompt, then what was
/// generated), as llama.cpp's `llama_sampler_init_penalties` computes them.
#[derive(Debug)]
struct Penalties {
    repeat: f32,
    frequency: f32,
    presence: f32,
    window: VecDeque<LlamaToken>,
    counts: HashMap<LlamaToken, u32>,
}

const LAST_N: usize = PENALTY_LAST_N as usize;

impl Penalties {
    /// None when every penalty is neutral (llama.cpp's `is_disabled`).
    fn new(s: &Sampling) -> Option<Self> {
        let neutral =
            s.repeat_penalty == 1.0 && s.frequency_penalty == 0.0 && s.presence_penalty == 0.0;
        (!neutral).then(|| Self {
            repeat: s.repeat_penalty,
            frequency: s.frequency_penalty,
            presence: s.presence_penalty,
            window: VecDeque::with_capacity(LAST_N),
            counts: HashMap::with_capacity(LAST_N),
        })
    }

    fn accept(&mut self, token: LlamaToken) {
        if self.window.len() == LAST_N
            && let Some(old) = self.window.pop_front()
            && let Some(count) = self.counts.get_mut(&old)
        {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&old);
            }
        }
        self.window.push_back(token);
        *self.counts.entry(token).or_default() += 1;
    }

    /// Each token of the window, as an index into the logits (which are
    /// indexed by token id), with its count.
    fn counts(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.counts
            .iter()
            .filter_map(|(token, &count)| Some((usize::try_from(token.0).ok()?, count)))
    }

    fn penalise(&self, logit: f32, count: u32) -> f32 {
        // Dividing a negative logit would make the token more likely, hence
        // llama.cpp multiplies those.
        let scaled = if logit <= 0.0 {
            logit * self.repeat
        } else {
            logit / self.repeat
        };
        scaled - (count as f32 * self.frequency + self.presence)
    }
}

/// One run's token picker.
pub(super) struct Picker {
    penalties: Option<Penalties>,
    /// llama.cpp's chain after the penalties; None for greedy.
    chain: Option<LlamaSampler>,
    /// Greedy: the penalised logits of the current step. Sampling: the
    /// candidates handed to the chain. Both reused from step to step.
    logits: Vec<f32>,
    candidates: Vec<LlamaTokenData>,
}

impl Picker {
    pub(super) fn new(s: &Sampling, seed: impl FnOnce() -> u32) -> Self {
        let chain = (s.temperature > 0.0).then(|| {
            let mut chain = Vec::new();
            if s.top_k > 0 {
                chain.push(LlamaSampler::top_k(s.top_k));
            }
            if s.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(s.top_p, 1));
            }
            if s.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(s.min_p, 1));
            }
            chain.push(LlamaSampler::temp(s.temperature));
            chain.push(LlamaSampler::dist(s.seed.unwrap_or_else(seed)));
            LlamaSampler::chain_simple(chain)
        });
        Self {
            penalties: Penalties::new(s),
            chain,
            logits: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Tokens already in the sequence: the penalty window starts with the
    /// end of the prompt, as in llama.cpp's own tools.
    pub(super) fn accept_all(&mut self, tokens: &[LlamaToken]) {
        if let Some(p) = &mut self.penalties {
            for &token in &tokens[tokens.len().saturating_sub(LAST_N)..] {
                p.accept(token);
            }
        }
    }

    /// The next token, from the logits of the sequence's last position; it
    /// joins the penalty window.
    pub(super) fn pick(&mut self, logits: &[f32]) -> LlamaToken {
        let token = match &mut self.chain {
            None => match &self.penalties {
                None => argmax(logits),
                Some(p) => {
                    self.logits.clear();
                    self.logits.extend_from_slice(logits);
                    for (i, count) in p.counts() {
                        if let Some(logit) = self.logits.get_mut(i) {
                            *logit = p.penalise(*logit, count);
                        }
                    }
                    argmax(&self.logits)
                }
            },
            Some(chain) => {
                let mut candidates = std::mem::take(&mut self.candidates);
                candidates.clear();
                candidates.extend(
                    logits
                        .iter()
                        .enumerate()
                        .map(|(i, &logit)| LlamaTokenData::new(LlamaToken(i as i32), logit, 0.0)),
                );
                if let Some(p) = &self.penalties {
                    for (i, count) in p.counts() {
                        if let Some(c) = candidates.get_mut(i) {
                            c.set_logit(p.penalise(c.logit(), count));
                        }
                    }
                }
                let mut array = LlamaTokenDataArray::new(candidates, false);
                array.apply_sampler(chain);
                let token = array
                    .selected_token()
                    .expect("the chain ends with a draw, which selects a token");
                self.candidates = array.data;
                token
            }
        };
        if let Some(p) = &mut self.penalties {
            p.accept(token);
        }
        token
    }
}

/// The first index of the largest logit (llama.cpp's greedy sampler).
fn argmax(logits: &[f32]) -> LlamaToken {
    let mut best = 0;
    for (i, &logit) in logits.iter().enumerate().skip(1) {
        if logit > logits[best] {
            best = i;
        }
    }
    LlamaToken(best as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of logits, positive and negative.
    fn logits(n: usize, salt: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let x = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(salt.wrapping_mul(40_503));
                (x % 2000) as f32 / 100.0 - 10.0
            })
            .collect()
    }

    /// What llama.cpp's `chain` picks from `logits`; the token joins its
    /// penalty window.
    fn llama_cpp_pick(chain: &mut LlamaSampler, logits: &[f32]) -> LlamaToken {
        let mut array = LlamaTokenDataArray::from_iter(
            logits
                .iter()
                .enumerate()
                .map(|(i, &v)| LlamaTokenData::new(LlamaToken(i as i32), v, 0.0)),
            false,
        );
        array.apply_sampler(chain);
        let token = array.selected_token().unwrap();
        chain.accept(token);
        token
    }

    /// Our penalties and argmax pick what llama.cpp's penalties + greedy
    /// chain picks, token after token, over a window that fills and slides.
    #[test]
    fn greedy_with_penalties_matches_llama_cpp() {
        let n_vocab = 500;
        let sampling = Sampling {
            repeat_penalty: 1.12,
            frequency_penalty: 0.3,
            presence_penalty: 0.2,
            ..Sampling::greedy()
        };
        let mut ours = Picker::new(&sampling, || 0);
        let mut theirs = LlamaSampler::chain_simple([
            LlamaSampler::penalties(n_vocab, PENALTY_LAST_N, 1.12, 0.3, 0.2),
            LlamaSampler::greedy(),
        ]);
        let prompt: Vec<_> = (0..100).map(|i| LlamaToken((i * 7) % 50)).collect();
        ours.accept_all(&prompt);
        theirs.accept_many(&prompt[prompt.len() - PENALTY_LAST_N as usize..]);
        for step in 0..200 {
            // Few distinct large logits, so penalties change the winner.
            let mut l = logits(n_vocab as usize, step);
            for (i, v) in l.iter_mut().enumerate().take(60) {
                *v = 10.5 + (i % 5) as f32 * 0.01;
            }
            let expected = llama_cpp_pick(&mut theirs, &l);
            assert_eq!(ours.pick(&l), expected, "step {step}");
        }
    }

    #[test]
    fn neutral_penalties_are_skipped_and_ties_take_the_first() {
        let mut picker = Picker::new(
            &Sampling {
                repeat_penalty: 1.0,
                ..Sampling::greedy()
            },
            || 0,
        );
        assert!(picker.penalties.is_none());
        assert_eq!(picker.pick(&[1.0, 3.0, 3.0, -2.0]), LlamaToken(1));
    }

    /// With a temperature, our penalties then llama.cpp's chain draw what
    /// llama.cpp's whole chain (penalties first) draws from the same seed.
    #[test]
    fn sampling_with_penalties_matches_llama_cpp() {
        let n_vocab = 400;
        let sampling = Sampling {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.3,
            frequency_penalty: 0.2,
            presence_penalty: 0.1,
            seed: Some(1234),
        };
        let mut ours = Picker::new(&sampling, || unreachable!("the seed is fixed"));
        let mut theirs = LlamaSampler::chain_simple([
            LlamaSampler::penalties(n_vocab, PENALTY_LAST_N, 1.3, 0.2, 0.1),
            LlamaSampler::top_k(40),
            LlamaSampler::top_p(0.95, 1),
            LlamaSampler::min_p(0.05, 1),
            LlamaSampler::temp(0.9),
            LlamaSampler::dist(1234),
        ]);
        let prompt: Vec<_> = (0..30).map(|i| LlamaToken((i * 3) % 20)).collect();
        ours.accept_all(&prompt);
        theirs.accept_many(&prompt);
        let mut distinct = std::collections::HashSet::new();
        for step in 0..300 {
            // A flat top, so that the draws vary and the penalties matter.
            let l: Vec<f32> = logits(n_vocab as usize, step)
                .into_iter()
                .enumerate()
                .map(|(i, v)| if i < 30 { 4.0 + v * 0.05 } else { v })
                .collect();
            let expected = llama_cpp_pick(&mut theirs, &l);
            assert_eq!(ours.pick(&l), expected, "step {step}");
            distinct.insert(expected);
        }
        assert!(distinct.len() > 5, "the draws vary: {distinct:?}");
    }
}
