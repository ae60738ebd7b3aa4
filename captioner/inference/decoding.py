"""Caption generation on numpy arrays: greedy, sampling and beam search over any `init_state` / `step` decoder.

The same rules as `captioner.decoding` (the torch implementation, which training and SCST still drive): never
PAD, START or UNK, never END before the first word, END forced on the step after `max_length` words, blocked
words (repeated n-grams too) masked out of the choice, and a caption's `log_prob` the model's own log-softmax
over the whole vocabulary. The decoder is anything with

    state = decoder.init_state(features)                # features (B, L, D) float32
    logits, alpha, state = decoder.step(state, tokens)  # tokens (N,) int64 -> logits (N, V), alpha (N, L)

whose state has `beta` (N, 1) and `select(index, same_image=False)`: the ONNX Runtime decoder
(captioner/inference/onnx_decoder.py) natively, the torch decoder through `captioner.decoding.NumpySteps`.
No torch here: this module is part of the torch-free install.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..options import DecodingOptions
from ..vocab import Vocabulary

END_ID = Vocabulary.end_id
NEG_INF = np.float32(-np.inf)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids: START excluded, END included
    log_prob: float  # sum of the model's own log p(token) (log-softmax over the whole vocabulary, temperature 1)
    score: float  # what the method ranked by: log_prob for greedy/sampling, / len**length_penalty for beam search
    alphas: np.ndarray = field(repr=False)  # (T, L)
    betas: np.ndarray = field(repr=False)  # (T,)
    truncated: bool = False  # END was forced at max_length


class ArrayStepDecoder(Protocol):
    def init_state(self, features: np.ndarray) -> Any: ...

    def step(self, state: Any, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]: ...


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, V), in x's dtype."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def generate(
    decoder: ArrayStepDecoder, features: np.ndarray, vocab: Vocabulary, options: DecodingOptions | None = None
) -> list[list[Hypothesis]]:
    """features (B, L, D) -> for each image, its captions best first (`num_captions` of them)."""
    options = options or DecodingOptions()
    features = np.ascontiguousarray(features, dtype=np.float32)
    if options.method == "beam":
        return beam_search(decoder, features, vocab, options)
    repeats = options.num_captions if options.method == "sample" else 1
    if options.method == "sample" and options.temperature > 0:
        rng = np.random.default_rng(options.seed)

        def choose(logits: np.ndarray) -> np.ndarray:
            return sample_tokens(logits, options.temperature, options.top_k, options.top_p, rng)
    else:  # greedy, or sampling at temperature 0, which is greedy by definition

        def choose(logits: np.ndarray) -> np.ndarray:
            return logits.argmax(axis=-1)

    flat = _decode_stepwise(decoder, features, repeats, vocab, options.max_length, choose,
                            options.no_repeat_ngram_size)
    per_image = [flat[i : i + repeats] for i in range(0, len(flat), repeats)]
    return [sorted(hyps, key=lambda h: h.log_prob, reverse=True) for hyps in per_image]


def never_allowed(vocab_size: int, vocab: Vocabulary, step: int, max_length: int) -> np.ndarray:
    """(V,) bool, True for what may never be said at this step: PAD/START/UNK always, END at the first step, all
    but END at the last. (The torch side masks with this too: captioner.decoding.allowed_logits.)"""
    if step >= max_length:
        mask = np.ones(vocab_size, dtype=bool)
        mask[vocab.end_id] = False
        return mask
    mask = np.zeros(vocab_size, dtype=bool)
    mask[list(vocab.blocked_ids)] = True
    if step == 0:
        mask[vocab.end_id] = True
    return mask


def allowed_logits(logits: np.ndarray, vocab: Vocabulary, step: int, max_length: int) -> np.ndarray:
    """`logits` (N, V) with what may never be said (`never_allowed`) at -inf."""
    return np.where(never_allowed(logits.shape[-1], vocab, step, max_length), NEG_INF, logits)


def choice_logits(
    logits: np.ndarray, vocab: Vocabulary, step: int, max_length: int, histories: list[list[int]], no_repeat: int
) -> np.ndarray:
    """`logits` (N, V) with every blocked word at -inf: the one rule every method chooses by."""
    allowed = allowed_logits(logits, vocab, step, max_length)
    if no_repeat > 0:
        ban_repeated_ngrams(allowed, histories, no_repeat)
    return allowed


def ban_repeated_ngrams(scores: np.ndarray, histories: list[list[int]], n: int) -> None:
    """In place: -inf for every token that would repeat an n-gram of its row's history (END never banned)."""
    rows: list[int] = []
    columns: list[int] = []
    for row, past in enumerate(histories):
        banned = _banned_ngram_tokens(past, n) - {END_ID}
        rows += [row] * len(banned)
        columns += banned
    if columns:
        scores[rows, columns] = NEG_INF


def _banned_ngram_tokens(history: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `history`."""
    if n <= 0 or len(history) < n - 1:
        return set()
    prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
    return {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i : i + n - 1]) == prefix}


def sample_tokens(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator
) -> np.ndarray:
    """logits (N, V) -> sampled ids (N,), after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.astype(np.float64) / temperature
    vocab_size = logits.shape[-1]
    if top_k > 0:
        k = min(top_k, vocab_size)
        kth = np.partition(logits, vocab_size - k, axis=-1)[:, vocab_size - k : vocab_size - k + 1]  # (N, 1)
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        probs = softmax(np.take_along_axis(logits, order, axis=-1))
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop_sorted = np.cumsum(probs, axis=-1) - probs >= top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits = np.where(drop, -np.inf, logits)
    cdf = np.cumsum(softmax(logits), axis=-1)  # (N, V)
    u = (1.0 - rng.random(len(logits)))[:, None] * cdf[:, -1:]  # in (0, total]: never a zero-probability word
    return np.minimum((cdf < u).sum(axis=-1), vocab_size - 1).astype(np.int64)


def _initial_rows(decoder: ArrayStepDecoder, features: np.ndarray, repeats: int) -> Any:
    """Each image's initial state computed once, then repeated `repeats` times in a row (N = B * repeats)."""
    state = decoder.init_state(features)
    if repeats == 1:
        return state
    return state.select(np.repeat(np.arange(len(features)), repeats))


def _decode_stepwise(
    decoder: ArrayStepDecoder, features: np.ndarray, repeats: int, vocab: Vocabulary, max_length: int,
    choose: Callable[[np.ndarray], np.ndarray], no_repeat_ngram_size: int = 0,
) -> list[Hypothesis]:
    """One token per step for every row (greedy and sampling): N = B * repeats hypotheses, image by image."""
    state = _initial_rows(decoder, features, repeats)
    n = len(features) * repeats
    rows = np.arange(n)
    tokens = np.full(n, vocab.start_id, dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    steps_tokens, steps_logp, steps_alpha, steps_beta = [], [], [], []
    for t in range(max_length + 1):
        logits, alpha, state = decoder.step(state, tokens)
        histories = np.stack(steps_tokens, 1).tolist() if no_repeat_ngram_size and steps_tokens else []
        chosen = choose(choice_logits(logits, vocab, t, max_length, histories, no_repeat_ngram_size))  # (N,)
        logp = log_softmax(logits)[rows, chosen]  # (N,) the model's own
        chosen = np.where(done, vocab.pad_id, chosen).astype(np.int64)
        steps_tokens.append(chosen)
        steps_logp.append(np.where(done, np.float32(0), logp))
        steps_alpha.append(alpha)
        steps_beta.append(state.beta[:, 0])
        done = done | (chosen == vocab.end_id)
        tokens = chosen
        if done.all():
            break
    all_tokens = np.stack(steps_tokens, 1).tolist()  # (N, T)
    all_logp = np.stack(steps_logp, 1).sum(1).tolist()
    all_alpha = np.stack(steps_alpha, 1)  # (N, T, L)
    all_beta = np.stack(steps_beta, 1)  # (N, T)
    hyps = []
    for i in range(n):
        length = all_tokens[i].index(vocab.end_id) + 1  # END is always reached (forced at max_length)
        hyps.append(Hypothesis(all_tokens[i][:length], all_logp[i], all_logp[i], all_alpha[i, :length],
                               all_beta[i, :length], truncated=length == max_length + 1))
    return hyps


def _topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise k largest of (B, M), best first, a tie to the lower index (blocked -inf ones too): (values, indices).
    k argmax passes: beam search asks for 2K of K * V (4 of 3,094 for the default decoding), where this takes
    ~10 us against argpartition's 31 (numpy 2.4, one core)."""
    # A copy in which -inf is the lowest finite float, so that a chosen entry (set to -inf) is never chosen again.
    work = np.maximum(x, -np.finfo(x.dtype).max)
    rows = np.arange(len(x))
    index = np.empty((len(x), k), dtype=np.int64)
    for j in range(k):
        index[:, j] = best = work.argmax(axis=1)
        work[rows, best] = -np.inf
    return x[rows[:, None], index], index


def beam_search(
    decoder: ArrayStepDecoder, features: np.ndarray, vocab: Vocabulary, options: DecodingOptions
) -> list[list[Hypothesis]]:
    """Batched beam search (the algorithm of `captioner.decoding.beam_search`, which documents it).
    features (B, L, D) -> per image its n-best (<= num_captions), best first."""
    b, k = len(features), options.beam_size
    state = _initial_rows(decoder, features, k)
    tokens = np.full(b * k, vocab.start_id, dtype=np.int64)
    scores = np.zeros((b, k), dtype=np.float32)  # cumulative log p of the alive beams
    scores[:, 1:] = NEG_INF  # all beams start identical: keep only the first alive
    history = np.zeros((b * k, 0), dtype=np.int64)  # (B*K, t)
    alpha_history = np.zeros((b * k, 0, features.shape[1]), dtype=np.float32)  # (B*K, t, L)
    beta_history = np.zeros((b * k, 0), dtype=np.float32)  # (B*K, t)
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    done = [False] * b

    for t in range(options.max_length + 1):
        logits, alpha, state = decoder.step(state, tokens)
        histories = history.tolist() if options.no_repeat_ngram_size else []
        blocked = choice_logits(logits, vocab, t, options.max_length, histories,
                                options.no_repeat_ngram_size) == NEG_INF
        logp = np.where(blocked, NEG_INF, log_softmax(logits.astype(np.float32)))  # (B*K, V) the model's own
        vocab_size = logp.shape[1]
        candidates = (scores.reshape(-1, 1) + logp).reshape(b, k * vocab_size)  # (B, K*V)
        top_scores, top_index = _topk(candidates, min(2 * k, k * vocab_size))  # (B, 2K), best first
        alpha_history = np.concatenate([alpha_history, alpha[:, None]], axis=1)
        beta_history = np.concatenate([beta_history, state.beta.reshape(-1, 1)], axis=1)

        next_rows, next_tokens, next_scores = [], [], []
        for i in range(b):
            alive: list[tuple[int, int, float]] = []
            if not done[i]:
                for rank, (score, index) in enumerate(zip(top_scores[i].tolist(), top_index[i].tolist(),
                                                          strict=True)):
                    row, word = i * k + index // vocab_size, index % vocab_size
                    if score == float("-inf") or len(alive) == k:
                        break  # the rest are impossible, or not needed
                    if word != vocab.end_id:
                        alive.append((row, word, score))
                    elif rank < k:
                        finished[i].append(_finished(history[row], word, score, alpha_history[row],
                                                     beta_history[row], options, t))
                finished[i] = sorted(finished[i], key=lambda h: h.score, reverse=True)[:k]
                done[i] = _image_done(finished[i], [s for _, _, s in alive], k, t + 1, options)
            if done[i]:
                alive = []
            # Pad with dead beams so every image keeps K rows (a dead beam has score -inf and is never chosen).
            alive += [(i * k, vocab.pad_id, float("-inf"))] * (k - len(alive))
            for row, word, score in alive:
                next_rows.append(row)
                next_tokens.append(word)
                next_scores.append(score)
        if all(done):
            break
        rows = np.array(next_rows, dtype=np.int64)
        tokens = np.array(next_tokens, dtype=np.int64)
        scores = np.array(next_scores, dtype=np.float32).reshape(b, k)
        state = state.select(rows, same_image=True)  # rows i*K..i*K+K-1 only ever come from image i
        history = np.concatenate([history[rows], tokens[:, None]], axis=1)
        alpha_history = alpha_history[rows]
        beta_history = beta_history[rows]

    return [f[: options.num_captions] for f in finished]


def _image_done(
    finished: list[Hypothesis], alive_scores: list[float], k: int, words: int, options: DecodingOptions
) -> bool:
    """True when `finished` holds K hypotheses and no alive beam can still beat the K-th; or nothing is alive."""
    if not alive_scores:
        return True
    if len(finished) < k:
        return False
    best_alive = max(_best_reachable_score(s, words, options) for s in alive_scores)
    return best_alive <= finished[-1].score


def _best_reachable_score(log_prob: float, words: int, options: DecodingOptions) -> float:
    """The highest score an alive beam can still finish with (further words only lower log p)."""
    if options.length_penalty > 0:
        return log_prob / (options.max_length + 1) ** options.length_penalty
    return log_prob / (words + 1) ** options.length_penalty


def _finished(past: np.ndarray, end_id: int, log_prob: float, alphas: np.ndarray, betas: np.ndarray,
              options: DecodingOptions, step: int) -> Hypothesis:
    tokens = [*past.tolist(), end_id]
    return Hypothesis(tokens=tokens, log_prob=log_prob, score=log_prob / (len(tokens) ** options.length_penalty),
                      alphas=alphas.copy(), betas=betas.copy(), truncated=step >= options.max_length)
