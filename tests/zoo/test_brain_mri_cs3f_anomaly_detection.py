"""Model Zoo unit tests of the bundle brain_mri_cs3f_anomaly_detection (the Zoo's ci/unit_tests/ pattern).

From a Model Zoo checkout, with the bundle in models/brain_mri_cs3f_anomaly_detection/ and this file
copied to ci/unit_tests/:

    python ci/unit_tests/runner.py --b brain_mri_cs3f_anomaly_detection

From the bundle's root, with its own tests: python -m pytest tests/zoo

The inference and evaluation workflows run as the Zoo runs them (ConfigWorkflow, property check, run,
finalize) on a tiny synthetic cohort (5 volumes at 32^3, slices encoded at 32 x 32), and
monai.bundle.load reads models/model.pt into network_def (the file is exported into a temporary
folder when the bundle has none).
"""

import csv
import json
import os
import shutil
import sys
import tempfile
import unittest
from pathlib import Path

import torch
from monai.bundle import ConfigParser, ConfigWorkflow, load

BUNDLE = "brain_mri_cs3f_anomaly_detection"
#: what the inference workflow of monai.bundle.load gets from an args file: where the bundle and the data are
ARGS_FILE_KEYS = ("bundle_root", "dataset_dir", "output_dir", "quiet")
METRIC_KEYS = ("patient_auroc", "patient_ap", "voxel_auroc", "voxel_ap", "dice_max", "fp_per_volume")


def bundle_root() -> str:
    """models/<bundle> of a Zoo checkout (the Zoo runs its tests from its root), else this file's bundle."""
    in_zoo = os.path.join("models", BUNDLE)
    if os.path.isfile(os.path.join(in_zoo, "configs", "inference.json")):
        return in_zoo
    return str(Path(__file__).resolve().parents[2])


def check_workflow(workflow: ConfigWorkflow, check_properties: bool = False) -> None:
    """Initialize, check the required properties, run and finalize a workflow (as the Zoo's tests do)."""
    workflow.initialize()
    if check_properties:
        check_result = workflow.check_properties()
        if check_result is not None and len(check_result) > 0:
            raise ValueError(f"check properties for workflow failed: {check_result}")
    workflow.run()
    workflow.finalize()


def test_order(test_name1: str, test_name2: str) -> int:
    """The Zoo runner's test order: inference, evaluation, then loading."""

    def get_order(name: str) -> int:
        return next((i for i, key in enumerate(("infer", "eval", "load")) if key in name), 3)

    return get_order(test_name1) - get_order(test_name2)


test_order.__test__ = False  # the Zoo runner's sort key, not a test for pytest


class TestCS3FAnomalyDetection(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.bundle_root = bundle_root()
        if cls.bundle_root not in sys.path:
            sys.path.insert(0, cls.bundle_root)  # the bundle's scripts/ package
        from scripts.synthetic.brain import generate_cohort

        cls.tmp = tempfile.mkdtemp()
        cls.dataset_dir = str(generate_cohort(Path(cls.tmp) / "cohort", n_normal=3, n_abnormal=2, shape=32, seed=3))

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def override(self, output: str) -> dict:
        return {
            "bundle_root": self.bundle_root,
            "dataset_dir": self.dataset_dir,
            "output_dir": os.path.join(self.tmp, output),
            "image_size": 32,
            "quiet": True,
            "dataloader#num_workers": 0,
        }

    def workflow(self, config_files: list, override: dict) -> ConfigWorkflow:
        configs = os.path.join(self.bundle_root, "configs")
        return ConfigWorkflow(
            workflow_type="infer",
            config_file=[os.path.join(configs, f) for f in config_files],
            logging_file=os.path.join(configs, "logging.conf"),
            meta_file=os.path.join(configs, "metadata.json"),
            **override,
        )

    def test_infer_config(self) -> None:
        override = self.override("infer")
        check_workflow(self.workflow(["inference.json"], override), check_properties=True)
        with open(os.path.join(override["output_dir"], "scores.csv")) as f:
            scores = list(csv.DictReader(f))
        self.assertEqual(len(scores), 5)
        for row in scores:
            self.assertTrue(os.path.isfile(os.path.join(override["output_dir"], row["image"] + "_anomaly.nii.gz")))

    def test_eval_config(self) -> None:
        override = {**self.override("eval"), "plots": False}
        check_workflow(self.workflow(["inference.json", "evaluate.json"], override), check_properties=True)
        with open(os.path.join(override["output_dir"], "metrics.json")) as f:
            metrics = json.load(f)
        for key in METRIC_KEYS:
            self.assertIn(key, metrics)

    def test_load_weights(self) -> None:
        """monai.bundle.load reads models/model.pt into network_def (given, or built by the inference
        workflow), and the weights are the default encoder's."""
        root = os.path.abspath(self.bundle_root)
        if os.path.isfile(os.path.join(root, "models", "model.pt")):
            bundle_dir, name = os.path.dirname(root), os.path.basename(root)
        else:  # a bundle checkout without its large files: export them into a bundle-shaped folder
            from scripts.export import export_model

            bundle_dir, name = os.path.join(self.tmp, "bundles"), BUNDLE
            export_model(os.path.join(bundle_dir, name, "models", "model.pt"), bundle_root=root)
            shutil.copytree(os.path.join(root, "configs"), os.path.join(bundle_dir, name, "configs"))
        parser = ConfigParser()
        parser.read_config(os.path.join(root, "configs", "inference.json"))
        parser["bundle_root"] = root
        reference = parser.get_parsed_content("network_def")

        network = load(name, bundle_dir=bundle_dir, model=parser.get_parsed_content("network_def"), device="cpu")
        args_file = os.path.join(self.tmp, "load_args.json")
        with open(args_file, "w") as f:
            json.dump({k: v for k, v in self.override("load").items() if k in ARGS_FILE_KEYS}, f)
        built = load(name, bundle_dir=bundle_dir, workflow_type="inference", args_file=args_file, device="cpu")
        self.assertEqual(type(built).__name__, "SliceFeatureNetwork")

        slices = torch.rand(2, 3, 112, 112)
        expected = reference(slices)
        for net in (network, built):
            state = net.state_dict()
            self.assertEqual(set(state), set(reference.state_dict()))
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(state[key].cpu(), value, rtol=0, atol=0)
            output = net.eval()(slices)
            self.assertEqual(tuple(output.shape), (2, 152, 14, 14))  # stage3 (40) + stage5 (112)
            torch.testing.assert_close(output, expected)


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
