"""Seeds for fuzz_pt in torch.save's zip format, written by Python's own
pickle (stand-in torch modules, so that the GLOBALs carry torch's names)
and zipfile: strided views, a shared storage, a Parameter, F16, protocol 4.
Run from the repository root: python3 tests/fuzz/make_corpus_pt.py"""
import collections, io, pickle, struct, sys, types, zipfile

torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")


class FloatStorage: pass
class HalfStorage: pass


def _rebuild_tensor_v2(*a): pass
def _rebuild_parameter(*a): pass


FloatStorage.__module__ = HalfStorage.__module__ = "torch"
_rebuild_tensor_v2.__module__ = _rebuild_parameter.__module__ = "torch._utils"
torch.FloatStorage, torch.HalfStorage = FloatStorage, HalfStorage
utils._rebuild_tensor_v2, utils._rebuild_parameter = _rebuild_tensor_v2, _rebuild_parameter
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils


class Sto:
    def __init__(s, key, typ, n): s.key, s.typ, s.n = key, typ, n


class T:
    def __init__(s, sto, off, shape, stride, param=False):
        s.a, s.param = (sto, off, shape, stride, False, collections.OrderedDict()), param

    def __reduce__(s):
        if s.param:
            return (_rebuild_parameter, (T(*s.a[:4]), True, collections.OrderedDict()))
        return (_rebuild_tensor_v2, s.a)


class P(pickle.Pickler):
    def persistent_id(s, o):
        return ("storage", o.typ, o.key, "cpu", o.n) if isinstance(o, Sto) else None


def save(path, sd, blobs, proto=2):
    b = io.BytesIO()
    P(b, protocol=proto).dump(sd)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b.getvalue())
        z.writestr("archive/version", "3\n")
        for k, v in blobs.items():
            z.writestr("archive/data/" + k, v)


s0, s1 = Sto("0", FloatStorage, 6), Sto("1", HalfStorage, 2)
sd = collections.OrderedDict()
sd["w"] = T(s0, 1, (2, 2), (1, 2))
sd["tied"] = T(s0, 0, (6,), (1,))
sd["p"] = T(s0, 2, (2,), (3,), True)
sd["h"] = T(s1, 0, (2,), (1,))
sd._metadata = collections.OrderedDict([("", {"version": 1})])
blobs = {"0": struct.pack("<6f", 0, 1, 2, 3, 4, 5), "1": struct.pack("<2e", 1.5, -2)}
d = "tests/fuzz/corpus_pt/"
save(d + "views.pt", sd, blobs)
save(d + "proto4.pt", sd, blobs, proto=4)
save(d + "empty.pt", collections.OrderedDict(), {})
