"""Stage 2 in S steps: a refiner that reads revealed fine tokens, its training mask, and the S-step sampler."""

import math

import pytest
import torch

from ctfgen.clustering import cluster_codebook
from ctfgen.models.refiner import Refiner, random_reveal, refiner_config
from ctfgen.sampling.params import SamplingParams
from ctfgen.sampling.refine import hidden_after_step, refine

K, V, T, CLASSES = 8, 64, 16, 10


def revealing_refiner(seed=0, fine_inputs=True):
    torch.manual_seed(seed)
    refiner = Refiner(refiner_config("GPT-tiny", coarse_vocab_size=K, vocab_size=V, block_size=T,
                                     num_classes=CLASSES, fine_inputs=fine_inputs)).eval()
    torch.nn.init.normal_(refiner.output.weight, std=1.0)
    return refiner


def record_fine_inputs(refiner, after=lambda h: h) -> list:
    """Make `refiner.hidden` note the fine tokens each pass reads (None: none), then apply `after` to its output."""
    seen, hidden = [], refiner.hidden

    def recording(coarse_rows, label_rows, fine=None):
        seen.append(None if fine is None else fine.clone())
        return after(hidden(coarse_rows, label_rows, fine))

    refiner.hidden = recording
    return seen


def test_the_schedule_hides_fewer_each_step_and_none_after_the_last():
    assert [hidden_after_step(s, 4, 64) for s in range(4)] == [math.floor(64 * math.cos(math.pi / 8)),
                                                               math.floor(64 * math.cos(math.pi / 4)),
                                                               math.floor(64 * math.cos(3 * math.pi / 8)), 0]
    assert hidden_after_step(0, 1, 64) == 0


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_one_step_is_the_one_pass_refiner_number_for_number(cfg_scale):
    """S = 1 samples each position from the softmax over its cluster's members given nothing revealed, by
    inverting that distribution at the position's number: computed here from the full logits, position by
    position."""
    refiner = revealing_refiner()
    coarse_map = cluster_codebook(torch.randn(V, 4), K, seed=0)
    coarse, labels = torch.randint(K, (6, T)), torch.randint(CLASSES, (6,))
    uniforms = torch.rand(6, 1, T, dtype=torch.float64)
    ours = refine(refiner, coarse, labels, coarse_map.coarse_of_fine, SamplingParams(cfg_scale=cfg_scale),
                  uniforms=uniforms)
    nothing = torch.full_like(coarse, V)  # the hidden token everywhere
    with torch.no_grad():
        cond = refiner(coarse, labels, fine=nothing)[0].double()
        uncond = refiner(coarse, torch.full_like(labels, CLASSES), fine=nothing)[0].double()
    logits = uncond + cfg_scale * (cond - uncond)
    for b in range(6):
        for t in range(T):
            members = (coarse_map.coarse_of_fine == coarse[b, t]).nonzero().flatten()
            cdf = logits[b, t, members].softmax(-1).cumsum(-1)
            expected = members[min(int(torch.searchsorted(cdf, uniforms[b, 0, t], right=True)), len(members) - 1)]
            assert ours[b, t] == expected


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_each_step_keeps_its_tokens_and_reveals_the_scheduled_share(steps):
    refiner = revealing_refiner()
    coarse_map = cluster_codebook(torch.randn(V, 4), K, seed=0)
    coarse, labels = torch.randint(K, (5, T)), torch.randint(CLASSES, (5,))
    seen = record_fine_inputs(refiner)
    fine = refine(refiner, coarse, labels, coarse_map.coarse_of_fine, steps=steps)
    assert torch.equal(coarse_map.coarse_of_fine[fine], coarse)  # within their clusters
    assert len(seen) == steps and (seen[0] == V).all()
    for step in range(1, steps):
        assert ((seen[step] == V).sum(1) == hidden_after_step(step - 1, steps, T)).all()
        kept = seen[step - 1] != V
        assert torch.equal(seen[step][kept], seen[step - 1][kept])  # a revealed token never changes
        assert torch.equal(fine[seen[step] != V], seen[step][seen[step] != V])


def test_the_positions_kept_are_the_most_confident():
    """With one position's logits made sharp, two steps keep it in the first step and hide the flat ones."""
    refiner = revealing_refiner()
    coarse_map = cluster_codebook(torch.randn(V, 4), K, seed=0)
    coarse, labels = torch.randint(K, (1, T)), torch.randint(CLASSES, (1,))
    # flat everywhere but position 3
    seen = record_fine_inputs(refiner, lambda h: torch.cat([h[:, :3] * 0, h[:, 3:4] * 100, h[:, 4:] * 0], 1))
    refine(refiner, coarse, labels, coarse_map.coarse_of_fine, SamplingParams(temperature=0), steps=2)
    assert (seen[1] != V).sum() == T - hidden_after_step(0, 2, T)
    assert seen[1][0, 3] != V


def test_several_steps_need_a_refiner_that_reads_fine_tokens():
    refiner = revealing_refiner(fine_inputs=False)
    coarse_map = cluster_codebook(torch.randn(V, 4), K, seed=0)
    with pytest.raises(ValueError, match="--reveal"):
        refine(refiner, torch.randint(K, (1, T)), torch.zeros(1, dtype=torch.long), coarse_map.coarse_of_fine, steps=2)


def test_training_reveals_a_random_share_and_hides_at_least_one():
    torch.manual_seed(0)
    revealed = random_reveal(torch.Size((4000, T)), "cpu")
    hidden = (~revealed).sum(1)
    assert hidden.min() >= 1 and hidden.max() == T
    # ceil(T cos(pi u / 2)) hidden: its mean over u ~ U(0, 1) is about T * 2 / pi + 1/2
    assert abs(hidden.double().mean().item() - (T * 2 / math.pi + 0.5)) < 0.3


def test_the_loss_counts_the_hidden_positions_only():
    refiner = revealing_refiner()
    coarse, labels = torch.randint(K, (3, T)), torch.randint(CLASSES, (3,))
    targets = torch.randint(V, (3, T))
    fine = targets.clone()
    fine[:, 5] = V  # only position 5 hidden
    with torch.no_grad():
        logits, loss = refiner(coarse, labels, targets, fine=fine)
    expected = torch.nn.functional.cross_entropy(logits[:, 5].double(), targets[:, 5])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_training_mode_reveals_targets_and_eval_mode_does_not():
    refiner = revealing_refiner()
    coarse, labels, targets = torch.randint(K, (2, T)), torch.randint(CLASSES, (2,)), torch.randint(V, (2, T))
    seen = record_fine_inputs(refiner)
    refiner.train()
    refiner(coarse, labels, targets)
    revealed = seen[-1] != V
    assert revealed.any() and torch.equal(seen[-1][revealed], targets[revealed])
    refiner.eval()
    refiner(coarse, labels, targets)
    assert seen[-1] is None  # nothing revealed: the loss scores every position


def test_the_pipeline_samples_stage_2_in_steps_under_its_seeding_rule(tmp_path):
    """Through the pipeline: more stage-2 passes leave stage 1's numbers (and so the coarse grids) as they were, keep
    every token in its cluster, give each image the same tokens whatever the batch, and survive a save and load."""
    from ctfgen.pipeline import CTFPipeline
    from test_pipeline import make_parts

    parts = make_parts()
    torch.manual_seed(1)
    parts["stage2"] = Refiner(refiner_config("GPT-tiny", coarse_vocab_size=8, vocab_size=64, block_size=64,
                                             num_classes=10, fine_inputs=True)).eval()
    torch.nn.init.normal_(parts["stage2"].output.weight, std=0.5)
    pipe = CTFPipeline(**parts)
    one = pipe([0, 3, 7], seed=5, output_type="pt")
    three = pipe([0, 3, 7], seed=5, stage2_sampling=SamplingParams(steps=3), output_type="pt")
    assert torch.equal(one.coarse, three.coarse) and not torch.equal(one.tokens, three.tokens)
    assert torch.equal(pipe.coarse_map.coarse_of_fine[three.tokens], three.coarse)
    batched = pipe([0, 3, 7], seed=5, stage2_sampling=SamplingParams(steps=3), batch_size=2, output_type="pt")
    assert torch.equal(batched.tokens, three.tokens)
    again = CTFPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "pipe"))
    reloaded = again([0, 3, 7], seed=5, stage2_sampling=SamplingParams(steps=3), output_type="pt")
    assert torch.equal(reloaded.tokens, three.tokens)
