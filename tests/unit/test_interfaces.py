"""`RolloutBatch.concat`: batches from several rollout engines keep the one token layout."""

import torch

from nemo_rl_fp16.interfaces import RolloutBatch

PAD = 0


def _batch(prompts: list[list[int]], responses: list[list[int]], g: int) -> RolloutBatch:
    p = max(len(x) for x in prompts)
    t = max(len(x) for x in responses)
    rows = []
    for i, r in enumerate(responses):
        pr = prompts[i // g]
        rows.append(([PAD] * (p - len(pr)) + pr, r + [PAD] * (t - len(r)), len(pr), len(r)))
    ids = torch.tensor([a + b for a, b, *_ in rows])
    attn = torch.tensor([[0] * (p - lp) + [1] * lp + [1] * lr + [0] * (t - lr) for _, _, lp, lr in rows])
    resp = attn[:, p:].clone()
    logp = -resp.float() * 0.5
    return RolloutBatch(input_ids=ids, attention_mask=attn, response_mask=resp, rollout_logp=logp, prompt_width=p,
                        prompt_index=torch.arange(len(responses)) // g)


def test_concat_repads_prompts_left_and_responses_right():
    a = _batch([[5, 6], [7]], [[9], [9, 9], [8, 8, 8], [8]], g=2)
    b = _batch([[1, 2, 3, 4]], [[3, 3], [3]], g=2)
    c = RolloutBatch.concat([a, b], PAD)
    assert c.prompt_width == 4 and c.response_mask.shape == (6, 3)
    assert c.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert c.input_ids[0].tolist() == [PAD, PAD, 5, 6, 9, PAD, PAD]
    assert c.input_ids[4].tolist() == [1, 2, 3, 4, 3, 3, PAD]
    # every row keeps its real tokens; the response mask is the attention mask's response part
    assert torch.equal(c.attention_mask[:, 4:], c.response_mask)
    assert torch.equal(c.attention_mask.sum(-1), torch.cat([a.attention_mask.sum(-1), b.attention_mask.sum(-1)]))
    assert c.rollout_logp.sum() == a.rollout_logp.sum() + b.rollout_logp.sum()
    assert torch.equal(c.responses[:4], a.responses)


def test_concat_of_one_batch_is_that_batch():
    a = _batch([[5, 6]], [[9], [9, 9]], g=2)
    assert RolloutBatch.concat([a], PAD) is a
