"""Caption generation on the decoder's `init_state` / `step`: greedy, sampling and beam search, batched.

Written once and shared by the CLI, the HTTP service, evaluation and visualisation. Every method:
- never emits PAD, START or UNK, and never ends a caption before its first word;
- stops a caption at END, and at `max_length` words by forcing END on the step after (so every caption
  ends with END, none is empty, and beam search always has finished hypotheses to return);
- returns the attention map (T, L) and gate beta (T,) of every generated token, END included.

One rule for every method: blocked words (PAD/START/UNK, END too early, repeated n-grams) are masked out of the
choice (`choice_logits`), and a caption's `log_prob` is the model's own log-probability of its words (log-softmax
over the whole vocabulary), so the same caption gets the same number from greedy, sampling and beam search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from .model import DecoderState
from .options import RECOMMENDED, DecodingOptions, Method  # noqa: F401 (defined in options.py, used from here too)
from .vocab import Vocabulary

END_ID = Vocabulary.end_id


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids: START excluded, END included
    log_prob: float  # sum of the model's own log p(token) (log-softmax over the whole vocabulary, temperature 1)
    score: float  # what the method ranked by: log_prob for greedy/sampling, / len**length_penalty for beam search
    alphas: torch.Tensor = field(repr=False)  # (T, L)
    betas: torch.Tensor = field(repr=False)  # (T,)
    truncated: bool = False  # END was forced at max_length


class StepDecoder(Protocol):
    """What decoding needs of a model: a single decoder or an ensemble (`captioner.ensemble`)."""

    def init_state(self, features: torch.Tensor) -> DecoderState: ...

    def step(self, state, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DecoderState]: ...


def generate(
    decoder: StepDecoder,
    features: torch.Tensor,
    vocab: Vocabulary,
    options: DecodingOptions | None = None,
) -> list[list[Hypothesis]]:
    """features (B, L, D) -> for each image, its captions best first (`num_captions` of them)."""
    options = options or DecodingOptions()
    with torch.no_grad():
        if options.method == "beam":
            return beam_search(decoder, features, vocab, options)
        repeats = options.num_captions if options.method == "sample" else 1
        if options.method == "sample" and options.temperature > 0:
            generator = torch.Generator(device=features.device)
            generator.manual_seed(options.seed if options.seed is not None else torch.seed())

            def choose(logits: torch.Tensor) -> torch.Tensor:
                return sample_tokens(logits, options.temperature, options.top_k, options.top_p, generator)
        else:  # greedy, or sampling at temperature 0, which is greedy by definition

            def choose(logits: torch.Tensor) -> torch.Tensor:
                return logits.argmax(dim=-1)

        flat = _decode_stepwise(decoder, features, repeats, vocab, options.max_length, choose,
                                options.no_repeat_ngram_size)
        per_image = [flat[i : i + repeats] for i in range(0, len(flat), repeats)]
        return [sorted(hyps, key=lambda h: h.log_prob, reverse=True) for hyps in per_image]


def allowed_logits(logits: torch.Tensor, vocab: Vocabulary, step: int, max_length: int) -> torch.Tensor:
    """Mask what may never be said: PAD/START/UNK always, END at the first step, all but END at the last."""
    logits = logits.clone()
    logits[:, list(vocab.blocked_ids)] = float("-inf")
    if step == 0:
        logits[:, vocab.end_id] = float("-inf")
    if step >= max_length:
        end_logit = logits[:, vocab.end_id].clone()
        logits.fill_(float("-inf"))
        logits[:, vocab.end_id] = end_logit
    return logits


def choice_logits(
    logits: torch.Tensor, vocab: Vocabulary, step: int, max_length: int, histories: list[list[int]], no_repeat: int
) -> torch.Tensor:
    """The one rule every method chooses by: `logits` (N, V) with every blocked word at -inf (PAD/START/UNK,
    END too early, anything but END too late, repeated n-grams of each row's `histories`)."""
    allowed = allowed_logits(logits, vocab, step, max_length)
    if no_repeat > 0:
        ban_repeated_ngrams(allowed, histories, no_repeat)
    return allowed


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """logits (N, V) -> sampled ids (N,), after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _decode_stepwise(decoder, features, repeats, vocab, max_length, choose, no_repeat_ngram_size=0) -> list[Hypothesis]:
    """One token per step for every row (greedy and sampling). features (B, L, D) -> N = B * repeats hypotheses,
    each image's `repeats` rows together."""
    state: DecoderState = _initial_rows(decoder, features, repeats)
    n = features.size(0) * repeats
    tokens = torch.full((n,), vocab.start_id, dtype=torch.long, device=features.device)
    done = torch.zeros(n, dtype=torch.bool, device=features.device)
    steps_tokens, steps_logp, steps_alpha, steps_beta = [], [], [], []
    for t in range(max_length + 1):
        logits, alpha, state = decoder.step(state, tokens)
        histories = torch.stack(steps_tokens, 1).tolist() if no_repeat_ngram_size and steps_tokens else []
        chosen = choose(choice_logits(logits, vocab, t, max_length, histories, no_repeat_ngram_size))  # (N,)
        logp = F.log_softmax(logits, dim=-1).gather(1, chosen.unsqueeze(1)).squeeze(1)  # (N,) the model's own
        chosen = chosen.masked_fill(done, vocab.pad_id)
        steps_tokens.append(chosen)
        steps_logp.append(logp.masked_fill(done, 0.0))
        steps_alpha.append(alpha)
        steps_beta.append(state.beta.squeeze(1))
        done = done | (chosen == vocab.end_id)
        tokens = chosen
        if bool(done.all()):
            break
    all_tokens = torch.stack(steps_tokens, 1).tolist()  # (N, T)
    all_logp = torch.stack(steps_logp, 1).sum(1).tolist()
    all_alpha = torch.stack(steps_alpha, 1).cpu()  # (N, T, L)
    all_beta = torch.stack(steps_beta, 1).cpu()  # (N, T)
    hyps = []
    for i in range(n):
        length = all_tokens[i].index(vocab.end_id) + 1  # END is always reached (forced at max_length)
        hyps.append(
            Hypothesis(
                tokens=all_tokens[i][:length],
                log_prob=all_logp[i],
                score=all_logp[i],
                alphas=all_alpha[i, :length],
                betas=all_beta[i, :length],
                truncated=length == max_length + 1,
            )
        )
    return hyps


def _initial_rows(decoder: StepDecoder, features: torch.Tensor, repeats: int) -> DecoderState:
    """The initial state of every image (B, L, D), each repeated `repeats` times in a row (N = B * repeats rows:
    beams or samples). Computed once per image, then copied: the image's W_a a_i is decoding's largest product."""
    state = decoder.init_state(features)
    if repeats == 1:
        return state
    return state.select(torch.arange(features.size(0), device=features.device).repeat_interleave(repeats))


def ban_repeated_ngrams(scores: torch.Tensor, histories: list[list[int]], n: int) -> None:
    """In place: -inf for every token that would repeat an n-gram of its row's history. scores (N, V).
    (END is never banned: blocking must not be able to stop a caption from ending.)"""
    rows: list[int] = []
    columns: list[int] = []
    for row, past in enumerate(histories):
        banned = _banned_ngram_tokens(past, n) - {END_ID}
        rows += [row] * len(banned)
        columns += banned
    if columns:  # one indexed write for the whole batch: this runs at every step of every method
        scores[rows, columns] = float("-inf")


def _banned_ngram_tokens(history: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `history`."""
    if n <= 0 or len(history) < n - 1:
        return set()
    prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
    return {
        history[i + n - 1]
        for i in range(len(history) - n + 1)
        if tuple(history[i : i + n - 1]) == prefix
    }


def beam_search(
    decoder: StepDecoder,
    features: torch.Tensor,
    vocab: Vocabulary,
    options: DecodingOptions,
) -> list[list[Hypothesis]]:
    """Batched beam search. features (B, L, D) -> per image its n-best (<= num_captions), best first.

    Each step every image expands its K alive beams and ranks the 2K best candidates by cumulative log p.
    A candidate that says END is set aside as finished only if it ranks within the top K (a worse one would
    not have survived as a beam either); the K best other candidates stay alive. An image is done when it
    has K finished hypotheses and no alive beam can still beat the K-th of them under the length penalty
    (`_best_reachable_score`). END is forced on the step after `max_length` words, so every image ends with
    finished hypotheses: no crash and no empty output when no beam says END on its own.
    """
    b, k = features.size(0), options.beam_size
    device = features.device
    state = _initial_rows(decoder, features, k)
    tokens = torch.full((b * k,), vocab.start_id, dtype=torch.long, device=device)
    scores = torch.zeros(b, k, device=device)  # cumulative log p of the alive beams
    scores[:, 1:] = float("-inf")  # all beams start identical: keep only the first alive
    history = torch.zeros(b * k, 0, dtype=torch.long, device=device)  # (B*K, t)
    alpha_history = features.new_zeros(b * k, 0, features.size(1))  # (B*K, t, L)
    beta_history = features.new_zeros(b * k, 0)  # (B*K, t)
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    done = [False] * b

    for t in range(options.max_length + 1):
        logits, alpha, state = decoder.step(state, tokens)
        histories = history.tolist() if options.no_repeat_ngram_size else []
        blocked = choice_logits(logits, vocab, t, options.max_length, histories,
                                options.no_repeat_ngram_size) == float("-inf")
        logp = F.log_softmax(logits, dim=-1).masked_fill(blocked, float("-inf"))  # (B*K, V) the model's own
        vocab_size = logp.size(1)
        candidates = (scores.view(-1, 1) + logp).view(b, k * vocab_size)  # (B, K*V)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab_size), dim=1)  # (B, 2K), best first
        alpha_history = torch.cat([alpha_history, alpha.unsqueeze(1)], dim=1)
        beta_history = torch.cat([beta_history, state.beta], dim=1)

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
        rows = torch.tensor(next_rows, device=device)
        tokens = torch.tensor(next_tokens, device=device)
        scores = torch.tensor(next_scores, device=device).view(b, k)
        state = state.select(rows, same_image=True)  # rows i*K..i*K+K-1 only ever come from image i
        history = torch.cat([history.index_select(0, rows), tokens.unsqueeze(1)], dim=1)
        alpha_history = alpha_history.index_select(0, rows)
        beta_history = beta_history.index_select(0, rows)

    return [f[: options.num_captions] for f in finished]


def _image_done(
    finished: list[Hypothesis], alive_scores: list[float], k: int, words: int, options: DecodingOptions
) -> bool:
    """True when `finished` (best first) holds K hypotheses and no alive beam (cumulative log p, `words`
    tokens so far) can still end with a better score than the K-th; or when nothing is alive any more."""
    if not alive_scores:
        return True
    if len(finished) < k:
        return False
    best_alive = max(_best_reachable_score(s, words, options) for s in alive_scores)
    return best_alive <= finished[-1].score


def _best_reachable_score(log_prob: float, words: int, options: DecodingOptions) -> float:
    """The highest score an alive beam with this cumulative log p and `words` tokens can still finish with.
    Further words only lower log p (<= 0), so the bound is log p divided by the most favourable length:
    the longest possible (END after max_length words) when the penalty rewards length, the shortest (END
    next) otherwise."""
    if options.length_penalty > 0:
        return log_prob / (options.max_length + 1) ** options.length_penalty
    return log_prob / (words + 1) ** options.length_penalty


def _finished(past, end_id, log_prob, alphas, betas, options: DecodingOptions, step: int) -> Hypothesis:
    tokens = [*past.tolist(), end_id]
    return Hypothesis(
        tokens=tokens,
        log_prob=log_prob,
        score=log_prob / (len(tokens) ** options.length_penalty),
        alphas=alphas.cpu(),
        betas=betas.cpu(),
        truncated=step >= options.max_length,
    )
