"""Repository throughput against plain xarray/Zarr on the same cube, same run.

sphx's write adds validation, time-order planning, a journal, per-image completion
marks and provenance on top of storing chunks; this measures what that costs against
``Dataset.to_zarr`` / ``xarray.open_zarr`` with the same chunking and codec, on full
2040x2040 images (IMAGE + FLAGS), with dask's threaded scheduler on both sides.

    python benchmarks/bench_repository.py [--images 24] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
from zarr.codecs import BloscCodec

import sphx
from sphx import SPHEREX, make_cube


def cube(n_images: int) -> xr.Dataset:
    n_obs = n_images // 2
    n = SPHEREX.n_active
    rng = da.random.default_rng(0)
    image = rng.normal(1.0, 0.05, (2, n_obs, n, n), chunks=(1, 1, n, n)).astype(np.float32)
    flags = (rng.random((2, n_obs, n, n), chunks=(1, 1, n, n)) < 0.01).astype(np.uint32) * 1024
    obsid = [f"2025W51_1A_0684_{i % 9 + 1}".replace("_0684_", f"_{684 + i // 9:04d}_") for i in range(n_obs)]
    return make_cube(image, level="quicklook", obsid=obsid, mjd_avg=61027.2 + np.arange(n_obs) / 600,
                     bands=[1, 4], flags=flags, units={"IMAGE": "electron / s"}).persist()


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    ds = cube(args.images)
    mb = sum(ds[v].nbytes for v in ("IMAGE", "FLAGS")) / 1e6
    work = Path(tempfile.mkdtemp(prefix="sphx-bench-"))
    codec = {"IMAGE": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
             "FLAGS": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")}
    enc = {v: {"chunks": (1, 1, SPHEREX.n_active, SPHEREX.n_active), "compressors": (codec[v],)} for v in codec}

    def plain_write():
        shutil.rmtree(work / "plain.zarr", ignore_errors=True)
        ds[["IMAGE", "FLAGS"]].to_zarr(work / "plain.zarr", encoding=enc, zarr_format=3, consolidated=False)

    def sphx_write():
        shutil.rmtree(work / "repo", ignore_errors=True)
        sphx.Repository.create(work / "repo").write_level("quicklook", ds)

    with dask.config.set(scheduler="threads"):
        t_plain_w, t_sphx_w = best(plain_write, args.repeat), best(sphx_write, args.repeat)
        repo = sphx.Repository.open(work / "repo")
        t_plain_r = best(lambda: xr.open_zarr(work / "plain.zarr", consolidated=False,
                                              chunks={"obs": 1})[["IMAGE", "FLAGS"]].compute(), args.repeat)
        t_sphx_r = best(lambda: repo.open_level("quicklook")[["IMAGE", "FLAGS"]].compute(), args.repeat)
    shutil.rmtree(work)
    print(f"{args.images} images of 2040x2040 (IMAGE float32 + FLAGS uint32, {mb:.0f} MB), threaded scheduler, "
          f"best of {args.repeat}")
    print(f"  write: xarray.to_zarr {t_plain_w:6.2f} s ({mb / t_plain_w:5.0f} MB/s) | sphx write_level "
          f"{t_sphx_w:6.2f} s ({mb / t_sphx_w:5.0f} MB/s) | sphx/xarray time ratio {t_sphx_w / t_plain_w:.2f}")
    print(f"  read:  xarray.open_zarr {t_plain_r:6.2f} s ({mb / t_plain_r:5.0f} MB/s) | sphx open_level "
          f"{t_sphx_r:6.2f} s ({mb / t_sphx_r:5.0f} MB/s) | sphx/xarray time ratio {t_sphx_r / t_plain_r:.2f}")


if __name__ == "__main__":
    main()
