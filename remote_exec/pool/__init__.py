"""Many hosts, many GPUs: the pool behind ``remote_exec.Executor``, ``task.map`` and ``rx map``.

The rooms:

- :mod:`.executor`: :class:`Executor`, a ``concurrent.futures.Executor`` (``submit``, ``map``,
  ``starmap``, ``shutdown``), and ``TaskFunction.map`` / ``.submit``;
- :mod:`.engine`: the pool's core: the calls, the hosts, one attempt, what each failure means;
- :mod:`.work`: a call (:class:`~.work.Work`) and the queue of calls waiting for a slot;
- :mod:`.placement`: hosts up, down or lost; slots; the GPU rules; which placement a host gets;
- :mod:`.slots`: the ``direct`` launcher's placement: slots with a persistent worker each;
- :mod:`.arrays`: a scheduler's placement (Slurm): the waiting calls as job arrays;
- :mod:`.events`: what a pool tells (an observer) and its counts;
- :mod:`.progress`: the live view (rich) and the plain lines;
- :mod:`.output`: the calls' output as whole lines prefixed with the call;
- :mod:`.sweep`: ``rx map``: a script over a grid of arguments, a parent run with a child per combination;
- :mod:`.status`: what ``rx hosts --status`` shows of each host.

On the host, :mod:`remote_exec.runner.slot` takes a slot (its lock file, its GPUs) for a pool's worker.
"""

from __future__ import annotations

from .engine import BrokenPool
from .executor import Executor
from .placement import GpuPolicy

__all__ = ["BrokenPool", "Executor", "GpuPolicy"]
