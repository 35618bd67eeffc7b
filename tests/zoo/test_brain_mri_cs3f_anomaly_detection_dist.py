"""Model Zoo multi-GPU unit test of brain_mri_cs3f_anomaly_detection (the Zoo's ci/unit_tests/ pattern).

From a Model Zoo checkout (this file copied to ci/unit_tests/):

    torchrun ci/unit_tests/runner.py --b brain_mri_cs3f_anomaly_detection --dist True

From the bundle's root: python -m pytest tests/zoo

configs/inference.json + multi_gpu_inference.json + multi_gpu_evaluate.json, with the test's overrides
exported to one config file, run under torchrun: one process per GPU (nccl) on a machine with 2 or more
GPUs, 2 processes with gloo on a machine without any (a single GPU cannot hold 2 ranks: skipped). The
maps of every volume and one metrics.json are written, the evaluation running once, on rank 0.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch
from monai.bundle import ConfigParser

BUNDLE = "brain_mri_cs3f_anomaly_detection"


def bundle_root() -> str:
    """models/<bundle> of a Zoo checkout (the Zoo runs its tests from its root), else this file's bundle."""
    in_zoo = os.path.join("models", BUNDLE)
    if os.path.isfile(os.path.join(in_zoo, "configs", "inference.json")):
        return in_zoo
    return str(Path(__file__).resolve().parents[2])


def export_config_and_run_mgpu_cmd(config_file: list, override: dict, output_path: str, nproc: int) -> None:
    """Merge the config files, apply ``override``, export the result and run it with torchrun."""
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(pairs=override)
    ConfigParser.export_config_file(parser.config, output_path, indent=4)
    configs = os.path.join(override["bundle_root"], "configs")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    cmd += [f"--nproc_per_node={nproc}", "-m", "monai.bundle", "run", "--config_file", output_path]
    cmd += ["--meta_file", os.path.join(configs, "metadata.json")]
    cmd += ["--logging_file", os.path.join(configs, "logging.conf")]
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (override["bundle_root"], env.get("PYTHONPATH")) if p)
    subprocess.check_call(cmd, env=env)


class TestCS3FAnomalyDetectionMGPU(unittest.TestCase):
    def setUp(self) -> None:
        self.bundle_root = os.path.abspath(bundle_root())
        if self.bundle_root not in sys.path:
            sys.path.insert(0, self.bundle_root)  # the bundle's scripts/ package
        from scripts.synthetic.brain import generate_cohort

        self.tmp = tempfile.mkdtemp()
        self.dataset_dir = str(generate_cohort(Path(self.tmp) / "cohort", n_normal=3, n_abnormal=2, shape=32))

    def tearDown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_mgpu_infer_eval_config(self) -> None:
        n_gpu = torch.cuda.device_count()
        if n_gpu == 1:
            self.skipTest("the multi-GPU configs need 2 or more GPUs (or none: 2 processes with gloo)")
        output_dir = os.path.join(self.tmp, "out")
        override = {
            "bundle_root": self.bundle_root,
            "dataset_dir": self.dataset_dir,
            "output_dir": output_dir,
            "image_size": 32,
            "quiet": True,
            "plots": False,
            "dataloader#num_workers": 0,
        }
        configs = os.path.join(self.bundle_root, "configs")
        files = ["inference.json", "multi_gpu_inference.json", "multi_gpu_evaluate.json"]
        export_config_and_run_mgpu_cmd(
            config_file=[os.path.join(configs, f) for f in files],
            override=override,
            output_path=os.path.join(self.tmp, "mgpu_evaluate.json"),
            nproc=max(n_gpu, 2),
        )
        with open(os.path.join(output_dir, "scores.csv")) as f:
            self.assertEqual(len(list(csv.DictReader(f))), 5)
        self.assertEqual(len(list(Path(output_dir).glob("*_anomaly.nii.gz"))), 5)
        with open(os.path.join(output_dir, "metrics.json")) as f:
            self.assertIn("voxel_auroc", json.load(f))


if __name__ == "__main__":
    unittest.main()
