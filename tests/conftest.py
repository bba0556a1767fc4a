import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*gemm_4bit.*")
# The suite checks the eager paths (list-wise and single-tensor) against references; the fused
# (compiled) path is switched on explicitly by the tests that check it equals them.
os.environ.setdefault("HINA_KOHYA_FUSED", "0")
# small chunks keep the compile time of the fused tests low; the code path is the same
os.environ.setdefault("HINA_KOHYA_FUSED_CHUNK", "2")
