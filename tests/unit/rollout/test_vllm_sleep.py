"""vLLM sleep mode state machine (colocated layout), against a stand-in `LLM` (no vLLM needed).

The real calls (`LLM(enable_sleep_mode=True)`, `sleep(level=1)`, `wake_up()`) only act on GPUs;
vLLM-CPU treats them as no-ops and the engine turns sleep mode off there.
"""

from nemo_rl_fp16.rollout.vllm_engine import VllmRolloutEngine


class FakeLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake" if tags is None else f"wake:{','.join(tags)}")


def _engine(sleep_mode: bool) -> VllmRolloutEngine:
    e = object.__new__(VllmRolloutEngine)  # the state machine only: no engine start
    e._sleep_mode, e._asleep, e.llm = sleep_mode, False, FakeLLM()
    return e


def test_sleep_offloads_once_and_wake_restores_once():
    e = _engine(True)
    assert e.sleep() and e.sleep()  # second call: already asleep, no second vLLM call
    e.wake_up()
    e.wake_up()
    assert e.llm.calls == ["sleep1", "wake"]


def test_without_sleep_mode_nothing_happens():
    e = _engine(False)
    assert e.sleep() is False
    e.wake_up()
    assert e.llm.calls == []


def test_refit_wakes_weights_only_and_generate_the_kv_cache():
    """Colocated order (issue 19): the refit needs the weights, not the KV cache; the cache comes
    back only when the engine generates, and nothing already awake is woken twice."""
    e = _engine(True)
    e.sleep()
    e.wake_up(["weights"])  # what update_weights / begin_refit do
    e.wake_up(["weights"])
    e.wake_up()  # what generate does
    e.wake_up()
    assert e.llm.calls == ["sleep1", "wake:weights", "wake:kv_cache"]
