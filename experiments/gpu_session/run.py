"""One accelerator lease, prepared as two calls: what refjax can only show on a GPU.

``probe`` (about 5 minutes): environment, RefShapes built on the machine, the accelerator table
(``benchmarks/accelerator_check.py``), then a calibration that runs eight training jobs at once
on the one GPU through the real drivers (``experiments/mrefm_ablation/run.py`` arms a-d, arm d
at batch 128, ``experiments/ras_refshapes/run.py`` arms nar/clip/all) for a few steps and
measures each job's steps/s under that contention. On the H200 it showed every job bound by its
input pipeline (README.md), so a concurrent ablation on one GPU was not pursued.

``demo``: the demo checkpoint alone (MRefM, then REC+RES transfer, the demo's model at a large
batch fed by many data workers), the transfer's steps sized from the pretraining's measured rate
to end inside ``--budget_s``; the run and its parameter-only export come back as tarballs.
``continue``: more transfer from a ``demo`` export (``--init``) at ``--lr``, in a later call.

    python experiments/gpu_session/run.py probe --work runs/gpu --out $OUT
    python experiments/gpu_session/run.py demo --work runs/gpu --out $OUT --budget_s 320
    python experiments/gpu_session/run.py continue --work runs/gpu --out $OUT \
        --init runs/gpu/export/oneref_demo --budget_s 190 --evals 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
from experiments.driver import child_env, set_args  # noqa: E402

TOKENIZER = os.path.join(ROOT, "checkpoints", "refshapes_kmeans_tokenizer")
RAS_RECIPE = (1500, 3000, 2000)
ABL_ARMS = ("a", "b", "c", "d")
RAS_ARMS = ("nar", "clip", "all")


def _env(gpu_shared: bool) -> dict[str, str]:
    env = child_env(REFJAX_ALLOCATOR="system", PYTHONUNBUFFERED="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, "runs", "jaxcache"))
    if gpu_shared:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def _data_dir(work: str) -> str:
    return os.path.abspath(os.path.join(work, "data"))


def jobs(work: str, out: str, steps: dict[str, dict]) -> dict[str, list[str]]:
    """The command of every concurrent job; ``steps[name]`` holds that job's step counts."""
    data, py = _data_dir(work), sys.executable
    log = ["--set", "train.log_every=10"]
    cmds: dict[str, list[str]] = {}
    for arm in ABL_ARMS:
        s = steps[f"abl_{arm}"]
        cmds[f"abl_{arm}"] = [
            py, "experiments/mrefm_ablation/run.py", "--data_dir", data, "--tokenizer", TOKENIZER,
            "--out", os.path.join(out, "abl"), "--arms", arm, "--pretrain_steps", str(s["pre"]),
            "--transfer_steps", str(s["tr"]), "--eval_every", str(s["eval_every"]),
            "--eval_batches", "20", "--seed", "13", "--set", "data.num_workers=1", *log]
    s = steps["demo"]
    cmds["demo"] = [
        py, "experiments/mrefm_ablation/run.py", "--data_dir", data, "--tokenizer", TOKENIZER,
        "--out", os.path.join(out, "demo"), "--arms", "d", "--pretrain_steps", str(s["pre"]),
        "--transfer_steps", str(s["tr"]), "--eval_every", str(s["eval_every"]),
        "--eval_batches", "20", "--seed", "13", "--set", "data.num_workers=3",
        "--set", "data.batch_size=128", *log]
    for arm in RAS_ARMS:
        s = steps[f"ras_{arm}"]
        cmds[f"ras_{arm}"] = [
            py, "experiments/ras_refshapes/run.py", "--data_dir", data,
            "--out", os.path.join(out, "ras"), "--arms", arm,
            "--stage_steps", ",".join(str(x) for x in s["stages"]), "--eval_batches", "20",
            "--splits", "val", "--seed", "0", "--set", "data.num_workers=1", *log,
            *(["--tasks", "ores,res,gres"] if arm == "nar" else [])]
    return cmds


def _only(cmds: dict[str, list[str]], only: str | None) -> dict[str, list[str]]:
    return {k: v for k, v in cmds.items() if not only or k in only.split(",")}


def run_jobs(cmds: dict[str, list[str]], logdir: str, timeout_s: float) -> dict[str, dict]:
    """Run every command concurrently; kill what is still running after ``timeout_s``."""
    os.makedirs(logdir, exist_ok=True)
    procs, t0 = {}, time.time()
    for name, cmd in cmds.items():
        f = open(os.path.join(logdir, f"{name}.log"), "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=_env(True), stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=False), f)
    done: dict[str, dict] = {}
    while len(done) < len(procs):
        time.sleep(2)
        for name, (p, f) in procs.items():
            if name in done:
                continue
            if p.poll() is not None:
                done[name] = {"rc": p.returncode, "wall_s": time.time() - t0}
                f.close()
                print(f"[gpu] {name} rc={p.returncode} after {time.time() - t0:.0f} s",
                      flush=True)
            elif time.time() - t0 > timeout_s:
                subprocess.run(["pkill", "-KILL", "-P", str(p.pid)], check=False)
                p.kill()
                p.wait()
                done[name] = {"rc": "killed", "wall_s": time.time() - t0}
                f.close()
                print(f"[gpu] {name} killed at {timeout_s:.0f} s", flush=True)
    return done


def _rates(workdir: str) -> float | None:
    """Mean steps/s of a run's training log, without its first entry (the compile)."""
    from refjax.train.trainer import read_curve

    vals = [r["steps_per_sec"] for r in read_curve(workdir, "train") if "steps_per_sec" in r][1:]
    return sum(vals) / len(vals) if vals else None


CALIB_STEPS = {**{f"abl_{a}": {"pre": 40, "tr": 40, "eval_every": 40} for a in ABL_ARMS},
               "demo": {"pre": 40, "tr": 40, "eval_every": 40},
               **{f"ras_{a}": {"stages": (30, 30, 30)} for a in RAS_ARMS}}


def _start_build(a: argparse.Namespace) -> subprocess.Popen | None:
    """Build RefShapes ``default`` under the work dir (in the background) unless it is there."""
    data = _data_dir(a.work)
    if os.path.exists(os.path.join(data, "refshapes", "default", "1.1.0", "dataset_info.json")):
        return None
    os.makedirs(a.out, exist_ok=True)
    benv = {**_env(False), "JAX_PLATFORMS": "cpu", "REFJAX_DATA_WORKERS": "12"}
    return subprocess.Popen([sys.executable, "-m", "refjax", "build-data", "refshapes",
                             "--data-dir", data], cwd=ROOT, env=benv,
                            stdout=open(os.path.join(a.out, "build.log"), "w"),
                            stderr=subprocess.STDOUT)


def probe(a: argparse.Namespace) -> None:
    import jax

    os.makedirs(a.out, exist_ok=True)
    # no jax.devices() here: this process must not take the GPU's memory from its children
    env = {"python": sys.version.split()[0], "jax": jax.__version__, "cpus": os.cpu_count()}
    for mod in ("flax", "optax", "orbax.checkpoint", "grain", "tensorflow_datasets"):
        try:
            env[mod] = __import__(mod, fromlist=["_"]).__version__
        except Exception as e:  # noqa: BLE001  (reported, not fatal)
            env[mod] = f"unavailable: {e}"
    print("[gpu] env", json.dumps(env), flush=True)
    t0 = time.time()
    build = _start_build(a)
    t1 = time.time()
    acc = subprocess.run([sys.executable, "benchmarks/accelerator_check.py", "--json",
                          os.path.join(a.out, "accelerator.json"),
                          *(["--smoke"] if a.smoke else [])], cwd=ROOT, env=_env(False),
                         capture_output=True, text=True, timeout=300)
    env["accelerator_check_s"] = time.time() - t1
    print(acc.stdout[-4000:], acc.stderr[-3000:] if acc.returncode else "", flush=True)
    with open(os.path.join(a.out, "accelerator.log"), "w") as f:
        f.write(acc.stdout + acc.stderr)
    if build is not None:
        build.wait()
        # the build runs beside the accelerator check: this is when the data was ready,
        # not how long the build took (its progress bars in build.log time it)
        env["data_ready_s"] = time.time() - t0
        print(f"[gpu] RefShapes ready {env['data_ready_s']:.0f} s after the probe began "
              f"(rc {build.returncode})", flush=True)
    calib_dir = os.path.join(a.work, "calib")
    t2 = time.time()
    res = run_jobs(_only(jobs(a.work, calib_dir, CALIB_STEPS), a.only),
                   os.path.join(a.work, "calib_logs"), a.calib_timeout_s)
    cal = {"jobs": res, "wall_s": time.time() - t2, "rates": {}}
    for name in res:
        if name.startswith("abl_") or name == "demo":
            arm = name[-1]
            root = os.path.join(calib_dir, "abl" if name != "demo" else "demo", arm)
            rates = {"pre": _rates(os.path.join(root, "pretrain")),
                     "tr": _rates(os.path.join(root, "transfer"))}
        else:
            root = os.path.join(calib_dir, "ras")
            arm = name[4:]
            key = {"nar": "all+pe", "clip": "clip", "all": "all"}[arm]
            rates = {"s1": _rates(os.path.join(root, f"stage1_{key}")),
                     "s2": _rates(os.path.join(root, arm, "stage2")),
                     "s3": _rates(os.path.join(root, arm, "stage3"))}
        cal["rates"][name] = rates
    cal["env"] = env
    os.makedirs(a.work, exist_ok=True)
    for path in (os.path.join(a.work, "calib.json"), os.path.join(a.out, "calib.json")):
        with open(path, "w") as f:
            json.dump(cal, f, indent=2, default=str)
    print("[gpu] calibration", json.dumps(cal["rates"]), json.dumps(res), flush=True)
    _tar(os.path.join(a.out, "calib.tgz"), [(os.path.join(a.work, "calib_logs"), "calib_logs"),
                                            (calib_dir, "calib")], exclude_ckpt=True)


def _tar(path: str, members: list[tuple[str, str]], exclude_ckpt: bool) -> None:
    def keep(info: tarfile.TarInfo):
        parts = info.name.split("/")
        if exclude_ckpt and ("checkpoints" in parts or "jaxcache" in parts):
            return None
        return info

    with tarfile.open(path, "w:gz") as t:
        for src, arc in members:
            if os.path.exists(src):
                t.add(src, arcname=arc, filter=keep)


def _cli(args: list[str], log: str, timeout_s: float) -> int:
    with open(log, "w") as f:
        try:
            return subprocess.run([sys.executable, "-m", "refjax", *args], cwd=ROOT,
                                  env=_env(False), stdout=f, stderr=subprocess.STDOUT,
                                  timeout=max(timeout_s, 1)).returncode
        except subprocess.TimeoutExpired:
            return -9


def demo(a: argparse.Namespace) -> None:
    """The demo checkpoint alone on the GPU: MRefM (paper recipe) then REC+RES transfer, the
    demo's model at batch ``--batch`` fed by ``--workers`` data workers; the transfer's steps
    are sized from the pretraining's measured rate to end by ``--budget_s``."""
    from refjax.demo import MODEL

    t_start = time.time()
    deadline = t_start + a.budget_s
    os.makedirs(a.out, exist_ok=True)
    build = _start_build(a)
    if build is not None:
        build.wait()
    print(f"[gpu] data ready after {time.time() - t_start:.0f} s", flush=True)
    work = os.path.join(a.work, "demo")
    os.makedirs(work, exist_ok=True)
    data = _data_sets(a)
    pre = os.path.join(work, "pretrain")
    rc = _cli(["train", "--config", "configs/oneref/mrefm.py:tiny,recipe=paper", "--workdir", pre,
               "--overwrite", *set_args([*MODEL, *data, f"model.tokenizer_init={TOKENIZER}",
                                      f"train.total_steps={a.pretrain_steps}",
                                      "train.eval_every=0",
                                      f"train.ckpt_every={a.pretrain_steps}", "eval.splits="])],
             os.path.join(work, "pretrain.log"), deadline - time.time())
    rate = _rates(pre) or 5.0
    t_pre = time.time() - t_start
    print(f"[gpu] pretraining rc={rc} {a.pretrain_steps} steps, {rate:.2f} steps/s, "
          f"at {t_pre:.0f} s", flush=True)
    left = deadline - time.time() - a.fixed_s
    steps = max(int(left * rate * 0.85) // 100 * 100, 100)
    steps = min(steps, a.max_transfer_steps)
    tr = os.path.join(work, "transfer")
    rc = _transfer(a, tr, pre, steps, [], deadline + a.slack_s - time.time())
    print(f"[gpu] transfer rc={rc} {steps} steps, {(_rates(tr) or 0):.2f} steps/s, at "
          f"{time.time() - t_start:.0f} s", flush=True)
    dst = _export(tr, os.path.join(a.work, "export", "oneref_demo"), work)
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump({"pretrain_steps": a.pretrain_steps, "transfer_steps": steps, "batch": a.batch,
                   "workers": a.workers, "pretrain_rate": rate, "transfer_rate": _rates(tr),
                   "wall_s": time.time() - t_start}, f, indent=2)
    _tar(os.path.join(a.out, "demo.tgz"), [(work, "demo")], exclude_ckpt=True)
    _tar(os.path.join(a.out, "export.tgz"), [(dst, "oneref_demo")], exclude_ckpt=False)
    if os.path.exists(os.path.join(tr, "metrics.json")):
        print(json.dumps(json.load(open(os.path.join(tr, "metrics.json")))["splits"])[:3000])
    print(f"[gpu] demo phase {time.time() - t_start:.0f} s", flush=True)


def _data_sets(a: argparse.Namespace) -> list[str]:
    """The data and logging overrides of every GPU training run: the machine's RefShapes, many
    workers, a large batch, and (``--tokenizer_path``) the tokenizer of the machine the model
    will ship from."""
    data = [f"data.data_dir={_data_dir(a.work)}", f"data.num_workers={a.workers}",
            f"data.batch_size={a.batch}", "train.seed=13", "train.progress=False",
            "train.log_every=50"]
    if a.tokenizer_path:
        data.append(f"data.tokenizer_path={os.path.abspath(a.tokenizer_path)}")
    return data


# What an export ships with instead of the GPU machine's data settings (`refjax export --set`).
PORTABLE = ("data.batch_size=32", "data.num_workers=0", "data.tokenizer_path=None")


def _export(workdir: str, dst: str, logdir: str) -> str:
    """A parameters-only export of ``workdir`` at ``dst`` (unless there), its config portable."""
    if not os.path.exists(dst):
        _cli(["export", "--workdir", workdir, "--out", dst, "--data-dir", "runs/demo/data",
              *set_args(PORTABLE)], os.path.join(logdir, "export.log"), 120)
    return dst


def _transfer(a: argparse.Namespace, workdir: str, init: str, steps: int, extra: list[str],
              timeout_s: float) -> int:
    """The demo's REC+RES transfer from ``init`` on the GPU data settings (``_data_sets``),
    ``--evals`` in-run val evaluations (10 batches) with a checkpoint at each; ``extra``
    overrides last. Returns the CLI's exit code (-9: stopped at ``timeout_s``)."""
    from refjax.demo import TRANSFER

    every = max(steps // a.evals // 50 * 50, 50)
    return _cli(["train", "--config", "configs/oneref/rec_res.py:tiny,task=res", "--workdir",
                 workdir, "--overwrite",
                 *set_args([*TRANSFER, *_data_sets(a), f"init={init}", *extra,
                            f"train.total_steps={steps}", f"train.eval_every={every}",
                            "train.eval_max_batches=10", f"train.ckpt_every={every}"])],
                os.path.join(os.path.dirname(workdir), "transfer.log"), timeout_s)


def cont(a: argparse.Namespace) -> None:
    """Continue the demo's transfer from ``--init`` (an export of ``demo``): a fresh warm-up and
    cosine at ``--lr`` for ``--steps`` steps with shuffle seed 14, the same data settings,
    stopped after ``--budget_s`` (the last checkpoint stands); exported and tarred."""
    t_start = time.time()
    os.makedirs(a.out, exist_ok=True)
    build = _start_build(a)
    if build is not None:
        build.wait()
    work = os.path.join(a.work, "cont")
    os.makedirs(work, exist_ok=True)
    tr = os.path.join(work, "transfer")
    rc = _transfer(a, tr, a.init, a.steps, [f"optim.lr={a.lr}", "train.seed=14"],
                   t_start + a.budget_s - time.time())
    print(f"[gpu] continued transfer rc={rc} (-9: stopped at the budget; the last checkpoint "
          f"stands), {(_rates(tr) or 0):.2f} steps/s", flush=True)
    dst = _export(tr, os.path.join(a.work, "export", "oneref_cont"), work)
    # an orbax tree is too deep to come back from $OUT as files: tarballs
    _tar(os.path.join(a.out, "cont.tgz"), [(work, "cont")], exclude_ckpt=True)
    _tar(os.path.join(a.out, "export.tgz"), [(dst, "oneref_cont")], exclude_ckpt=False)
    print(f"[gpu] continue phase {time.time() - t_start:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("probe", "demo", "continue"))
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "gpu"))
    p.add_argument("--out", required=True)
    p.add_argument("--calib_timeout_s", type=float, default=200)
    p.add_argument("--budget_s", type=float, default=360,
                   help="demo, continue: end training by then")
    p.add_argument("--slack_s", type=float, default=60, help="demo: grace for the transfer")
    p.add_argument("--only", default=None, help="comma list of job names (a local dry run)")
    p.add_argument("--smoke", action="store_true", help="accelerator check at smoke sizes")
    p.add_argument("--batch", type=int, default=128, help="demo: batch size")
    p.add_argument("--workers", type=int, default=14, help="demo: data workers")
    p.add_argument("--pretrain_steps", type=int, default=1000, help="demo: MRefM steps")
    p.add_argument("--max_transfer_steps", type=int, default=6000)
    p.add_argument("--fixed_s", type=float, default=60, help="demo: transfer compile + evals")
    p.add_argument("--evals", type=int, default=3, help="in-run val evaluations")
    p.add_argument("--init", default=None, help="continue: the export to continue from")
    p.add_argument("--steps", type=int, default=2500, help="continue: transfer steps")
    p.add_argument("--lr", type=float, default=5e-4, help="continue: peak learning rate")
    p.add_argument("--tokenizer_path", default=None,
                   help="demo: the BEiT-3 sentencepiece model to read the text with (carry the "
                        "one of the machine the model will ship from)")
    a = p.parse_args()
    a.work = os.path.abspath(a.work)
    if a.phase == "continue" and not a.init:
        p.error("continue needs --init (an export of the demo phase)")
    {"probe": probe, "demo": demo, "continue": cont}[a.phase](a)


if __name__ == "__main__":
    main()
