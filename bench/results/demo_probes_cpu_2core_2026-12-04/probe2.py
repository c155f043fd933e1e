import sys, copy, logging
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
from tsvd.peft.seg import demo as Dm, train as T, embedded as E
S = copy.deepcopy(Dm.DEMO)
cache = Path("/work/sel/cache")
src = E.build_dataset("source", n_train=S["source_train"], n_valid=S["source_valid"], n_test=0,
                      spacing=S["spacing"], seed=0, cache_dir=cache, workers=2, log=logging.info)
tgt = E.build_dataset(S["dataset"], n_train=S["n_train"], n_valid=S["n_valid"], n_test=S["n_test"],
                      test_start=S["test_start"], spacing=S["spacing"], seed=0, cache_dir=cache,
                      workers=2, log=logging.info)
base = Dm.cached_pretrain(S, src, cache, seed=0, progress=False)
loss, lr, ep, method = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
S["finetune"] = dict(S["finetune"], lr=lr, epochs=ep, loss=loss)
if len(sys.argv) > 6: S["flip_axes"] = [int(a) for a in sys.argv[6].split(",")]
import torch; torch.set_num_threads(int(sys.argv[7]) if len(sys.argv) > 7 else 2)
cfg = Dm.stage_config(S, tgt, "finetune", method=method, seed=0)
cfg.model.pretrained = str(base)
T.train(cfg.validate(), Path(sys.argv[5]), task="finetune", overwrite=True, progress=False)
