//! The batched sampler on the default model: determinism, batch independence, stops.

use candle_core::{DType, Device};
use loralab::model::{self, LoadOptions, Message};
use loralab::sample::{sample, FinishReason, SampleOptions};

fn setup() -> (model::Model, Vec<Vec<u32>>) {
    let m = model::load(model::DEFAULT_MODEL, &LoadOptions { dtype: DType::F32, device: Device::Cpu }).unwrap();
    let chat = |sys: &str, user: &str| {
        let msgs = vec![
            Message { role: "system".into(), content: sys.into() },
            Message { role: "user".into(), content: user.into() },
        ];
        m.tokenizer.encode(&m.tokenizer.chat_prompt(&msgs, true).unwrap()).unwrap()
    };
    let prompts = vec![
        chat("You are a pirate.", "Where is the treasure?"),
        chat(
            "You are a helpful assistant.",
            "Name a colour, with a much longer question so that this prompt needs left padding.",
        ),
    ];
    (m, prompts)
}

fn opts(n: usize, seed: u64) -> SampleOptions {
    SampleOptions { n, temperature: 1.0, max_tokens: 12, seed, ..Default::default() }
}

#[test]
fn the_same_seed_gives_the_same_completions_and_another_seed_others() {
    let (m, prompts) = setup();
    let (a, _) = sample(&m, None, &prompts, &opts(3, 7)).unwrap();
    let (b, _) = sample(&m, None, &prompts, &opts(3, 7)).unwrap();
    let (c, _) = sample(&m, None, &prompts, &opts(3, 8)).unwrap();
    let texts =
        |x: &Vec<Vec<loralab::sample::Completion>>| x.iter().flatten().map(|c| c.text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&a), texts(&b));
    assert_ne!(texts(&a), texts(&c));
    // The n completions of one prompt are different draws.
    assert!(a[0][0].text != a[0][1].text || a[0][1].text != a[0][2].text);
}

#[test]
fn a_completion_does_not_depend_on_the_other_prompts_of_its_batch() {
    let (m, prompts) = setup();
    let greedy = SampleOptions { temperature: 0.0, max_tokens: 12, ..Default::default() };
    let (together, _) = sample(&m, None, &prompts, &greedy).unwrap();
    let (alone, _) = sample(&m, None, &prompts[..1], &greedy).unwrap();
    assert_eq!(together[0][0].token_ids, alone[0][0].token_ids);
    // Sampled too: each completion has its own random stream (keyed by prompt index and sample).
    let (first_alone, _) = sample(&m, None, &prompts[..1], &opts(2, 5)).unwrap();
    let (both, _) = sample(&m, None, &prompts, &opts(2, 5)).unwrap();
    assert_eq!(both[0][0].token_ids, first_alone[0][0].token_ids);
    assert_eq!(both[0][1].token_ids, first_alone[0][1].token_ids);
}

#[test]
fn a_prompt_that_joins_the_batch_as_rows_finish_draws_what_it_draws_after_them() {
    let (m, prompts) = setup();
    // One prompt per group (batch_size / n); rows end at their first ".", at different steps.
    let at_most = |batch_size: usize| SampleOptions { batch_size, stop: vec![".".into()], ..opts(3, 11) };
    // Rows for two groups at once: the second joins once one row of the first has finished.
    let (joined, joined_stats) = sample(&m, None, &prompts, &at_most(5)).unwrap();
    // Rows for one group: the second starts after the first has finished.
    let (after, after_stats) = sample(&m, None, &prompts, &at_most(3)).unwrap();
    assert_eq!((joined_stats.peak_rows, after_stats.peak_rows), (5, 3));
    assert!(joined_stats.decode_steps < after_stats.decode_steps);
    let ids = |x: &Vec<Vec<loralab::sample::Completion>>| {
        x.iter().flatten().map(|c| (c.token_ids.clone(), c.finish_reason)).collect::<Vec<_>>()
    };
    assert_eq!(ids(&joined), ids(&after));
}

#[test]
fn prompts_in_groups_of_one_draw_what_they_draw_alone_and_a_group_must_fit_in_the_batch() {
    let (m, prompts) = setup();
    let grouped = SampleOptions { group_size: 1, batch_size: 6, ..opts(3, 4) };
    let (both, stats) = sample(&m, None, &prompts, &grouped).unwrap();
    assert_eq!(stats.peak_rows, 6);
    // The first prompt in a group of its own: no padding, as when it is sampled alone.
    let (alone, _) = sample(&m, None, &prompts[..1], &opts(3, 4)).unwrap();
    let ids = |x: &[loralab::sample::Completion]| x.iter().map(|c| c.token_ids.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&both[0]), ids(&alone[0]));
    let too_big = SampleOptions { group_size: 3, batch_size: 6, ..opts(3, 4) };
    let err = sample(&m, None, &prompts, &too_big).unwrap_err().to_string();
    assert!(err.contains("group_size 3") && err.contains("batch_size 6"), "{err}");
}

#[test]
fn rows_stop_at_max_tokens_or_a_stop_string() {
    let (m, prompts) = setup();
    let (out, stats) =
        sample(&m, None, &prompts, &SampleOptions { max_tokens: 5, ignore_eos: true, ..opts(2, 1) }).unwrap();
    for c in out.iter().flatten() {
        assert_eq!(c.token_ids.len(), 5);
        assert_eq!(c.finish_reason, FinishReason::Length);
    }
    assert_eq!(stats.generated_tokens, 20);
    let stop = SampleOptions { stop: vec![" ".into()], max_tokens: 30, ..opts(1, 2) };
    let (out, _) = sample(&m, None, &prompts, &stop).unwrap();
    for c in out.iter().flatten() {
        assert!(!c.text.contains(' '), "{:?}", c.text);
    }
}

#[test]
fn continuous_batching_asked_for_on_the_cpu_keeps_the_groups_and_their_completions() {
    // The CPU has no slot kernels: the option changes nothing there (GPU tests: tests/cuda.rs).
    let (m, prompts) = setup();
    assert!(!m.decoder.slots_apply(model::Pass::infer(None)));
    let (on, _) = sample(&m, None, &prompts, &SampleOptions { continuous_batching: true, ..opts(2, 9) }).unwrap();
    let (off, _) = sample(&m, None, &prompts, &SampleOptions { continuous_batching: false, ..opts(2, 9) }).unwrap();
    let ids =
        |x: &Vec<Vec<loralab::sample::Completion>>| x.iter().flatten().map(|c| c.token_ids.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&on), ids(&off));
}
