import sys, copy, logging, json
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
from tsvd.peft.seg import demo as Dm, train as T
S = copy.deepcopy(Dm.DEMO)
S["finetune"] = dict(S["finetune"], lr=5e-3, epochs=int(sys.argv[1]))
S["flip_axes"] = [int(a) for a in sys.argv[2].split(",")]
tgt = Path(sys.argv[3])
pdir = Path(sys.argv[4]); info = json.loads((pdir / "run.json").read_text())
cfg = Dm.stage_config(S, tgt, "finetune", method="lorapt", seed=0)
cfg.data.crop_margin = int(sys.argv[6])
import torch; torch.set_num_threads(1)
cfg.model.pretrained = str(pdir / info["artefacts"][info["default_artefact"]])
T.train(cfg.validate(), Path(sys.argv[5]), task="finetune", overwrite=True, progress=False)
