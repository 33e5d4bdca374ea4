"""`mixflow plan`: memory and FLOPs of a compiled train step, on fake devices, without data."""

import json
import os
import subprocess
import sys

from mixflow_jax import plan
from tests import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_reports_remat_lowering_temp_bytes_and_flops(config):
  """Saved activations grow with depth (scanned: the compile time does not), so that
  they, not the fixed buffers, make up the temp bytes of the step without remat."""
  config.model.depth, config.model.hidden_size, config.model.scan_blocks = 4, 64, True
  config.data.batch_size, config.data.image_shape, config.data.num_classes = 64, (8, 8, 1), 4
  results = {}
  for remat in ("none", "full"):
    config.model.remat = remat
    results[remat] = plan.plan(config)
  temp = {k: v["temp_bytes_per_device"] for k, v in results.items()}
  assert temp["full"] < 0.5 * temp["none"], temp
  # Model FLOPs do not count remat's recompute; XLA's count of the compiled step does.
  assert results["full"]["flops_per_step"] == results["none"]["flops_per_step"]
  assert (results["full"]["compiled_flops_per_device"]
          > 1.2 * results["none"]["compiled_flops_per_device"])
  r = results["none"]
  assert r["peak_bytes_per_device"] == (r["argument_bytes_per_device"]
                                        + r["output_bytes_per_device"]
                                        - r["alias_bytes_per_device"]
                                        + r["temp_bytes_per_device"])
  assert r["largest_params"][0]["path"].endswith("kernel")
  assert "peak per device" in plan.format_table(r)


def test_plan_fakes_devices_shards_the_state_and_writes_json(tmp_path):
  """`mixflow plan --num_devices=4`: no data or checkpoint read; the FSDP state is a
  quarter per device."""
  config = distributed.config_file(str(tmp_path / "config.py"), """
      from tests.conftest import tiny_config
      return tiny_config()
  """)
  out = tmp_path / "plan.json"
  result = subprocess.run(
      [sys.executable, "-m", "mixflow_jax", "plan", f"--config={config}", "--num_devices=4",
       "--config.train.num_fsdp=-1", "--config.train.fsdp_min_size=0", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  written = json.loads(out.read_text())
  assert written["num_devices"] == 4 and written["mesh"] == {"data": 1, "fsdp": 4}
  assert written["state_bytes_per_device"] < 0.3 * written["state_bytes"]
  assert "'fsdp'" in written["largest_params"][0]["spec"]
  assert written["flops_per_step"] > 0 and written["compile_seconds"] > 0
  assert "peak per device" in result.stdout
