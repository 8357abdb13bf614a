"""``python -m tests.bench.cprofile_threads OUT -m MODULE ARGS...``: cProfile every thread.

``python -m cProfile`` profiles the main thread only, and the reference EST
server (``ThreadingHTTPServer``) handles each connection in a thread of its
own, so its profile shows a main thread sleeping. This runs ``MODULE`` as
``__main__`` with one profiler per thread (``threading.Thread.run`` wrapped)
and, when the module returns or exits, writes the merged statistics of the
main thread and of every thread that finished to ``OUT`` (read them with
``python -m pstats OUT``). Threads still running at that point (the accept
loop) are left out: their profiler is still collecting.

Used by ``scripts/bench --cprofile-server FILE``; a development tool, not installed.
"""

from __future__ import annotations

import cProfile
import pstats
import runpy
import sys
import threading


def main(argv: list[str]) -> int:
    """Run ``-m MODULE ARGS`` under per-thread profilers; write the merged stats to OUT."""
    if len(argv) < 3 or argv[1] != "-m":
        print("usage: python -m tests.bench.cprofile_threads OUT -m MODULE [ARGS...]",
              file=sys.stderr)
        return 2
    out, module, args = argv[0], argv[2], argv[3:]
    merged: list[pstats.Stats] = []  # one Stats, made from the first finished thread
    lock = threading.Lock()
    run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        profile = cProfile.Profile()
        profile.enable()
        try:
            run(self)
        finally:
            profile.disable()
            # Merge now: thousands of connection threads kept as profiles would grow
            # the server by hundreds of MB and make the dump at exit slow.
            with lock:
                if merged:
                    merged[0].add(profile)
                else:
                    merged.append(pstats.Stats(profile))

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    main_profile = cProfile.Profile()
    sys.argv = [module, *args]
    code = 0
    main_profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        main_profile.disable()
        with lock:
            stats = pstats.Stats(main_profile)
            if merged:
                stats.add(merged[0])
        stats.dump_stats(out)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
