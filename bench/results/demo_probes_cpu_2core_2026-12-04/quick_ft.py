import sys, json, copy, logging
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
from tsvd.peft.seg import demo as Dm, train as T
S = copy.deepcopy(Dm.DEMO)
loss, lr, ep, method = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
S["finetune"] = dict(S["finetune"], lr=lr, epochs=ep, loss=loss)
tgt = Path("/work/sel/cache/embedded/neuromorphometrics_v2_n12-4-20_sp1.5_s0_t8")
base = "/work/sel/cache/pretrained/unetr-cpu-source-ca2a83380fdb/model_best.safetensors"
cfg = Dm.stage_config(S, tgt, "finetune", method=method, seed=0)
cfg.model.pretrained = base
T.train(cfg.validate(), Path(sys.argv[5]), task="finetune", overwrite=True, progress=False)
