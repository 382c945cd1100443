"""The benchmarks, all in one place (``bench/``, import package ``streamscore_bench``, extra ``[bench]``).

- ``fastpath_bench``: the fast path's micro-benchmark (``make bench-fastpath``; ``--quick`` for seconds);
- ``profile_worker``: a worker under py-spy, CPU share per pipeline stage;
- the rest: ``streamscore bench`` (``make bench``), described below. Results go to ``bench/results/``
  (relative to the current directory) unless ``--out`` says otherwise.

``streamscore bench``: the end-to-end benchmark against the real local stack, peers in the same run.

Variants, each in its own subprocess(es) with its own topic prefix (fresh topics, 4 partitions), so none sees
another's messages or cache entries:

a. ``raw_aiokafka``: aiokafka passthrough (consume, decode, encode, produce in batches; no features, no
   model), the ceiling of Python on this machine (``baselines.py``);
b. ``faust_per_event``: a straightforward per-event Faust agent doing the full work (``baselines.py``);
c. ``streamscore``: ``python -m streamscore worker --model fraud``, one process and then two.

Throughput: a backlog is loaded while the process under test is frozen, then it drains it alone; events/s is
the requests answered over the span of the predictions' Kafka timestamps. Latency (c only): an open-loop
producer at 50/70/90% of c's maximum and a subscriber (``loadgen.py``), percentiles from an HDR histogram.
Workload and the 95%-hit/5%-miss feature lookups: ``workload.py``. Orchestration: ``harness.py``. Files:
``report.py`` writes ``e2e.json``, ``e2e.md`` and ``e2e.png``.
"""


class BenchFailed(RuntimeError):
    """The benchmark could not measure what it set out to; the message says what and where to look."""
