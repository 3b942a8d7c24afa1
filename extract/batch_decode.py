"""Batched JPEG decoding and preprocessing on tensors (on a GPU).

The CPUs of a GPU box cannot decode fast enough to feed it (FACTS: ~450 img/s from 16
cores with PIL). Here a batch of JPEG byte strings is decoded on the device and resized,
cropped and normalised there from uint8, mirroring the recipe of
:class:`extract.preprocess.Preprocessing` (resize with antialiased bicubic/bilinear,
rounded back to 8 bits as PIL does, center crop, mean/std). Two batch decoders:

``nvimgcodec``
    nvImageCodec (``pip install nvidia-nvimgcodec-cu13[nvjpeg]``): on data-centre GPUs
    with hardware JPEG engines (A100, H100, H200) the decode runs on those engines and
    leaves the SMs to the model; files the engines do not take go to nvImageCodec's CUDA
    decoder. On a machine without CUDA it runs libjpeg-turbo (how it is tested here).
``nvjpeg``
    torchvision's ``decode_jpeg(..., device="cuda")``: nvJPEG kernels on the SMs. On a
    CPU device the same call runs libjpeg-turbo.

Anything the batch decoder should not or cannot handle -- non-JPEG files, CMYK or
EXIF-rotated JPEGs, corrupt data -- is returned for per-image CPU decoding, so a batch
never fails as a whole. On a CPU device the same code runs with libjpeg-turbo, which is
how the tensor path is tested without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import math
import os
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from cache.errors import Stage1Error
from extract.jpeg_header import jpeg_info, needs_cpu
from extract.mempool import keep_pool_memory
from extract.preprocess import Preprocessing
from extract.resample import crop_box, horizontal_first, pil_weights, round_like_pil

# Inputs may be read-only views of shared memory; the decoders only read them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

__all__ = ["BATCH_DECODERS", "BatchPreprocessor", "has_jpeg_engines", "needs_cpu", "nvimgcodec",
           "resolve_batch_decoder"]

BATCH_DECODERS = ("nvimgcodec", "nvjpeg")
@contextlib.contextmanager
def _quiet_stderr():
    """nvImageCodec prints to the C-level stderr when it loads its optional extensions
    (JPEG 2000, TIFF); those are not used here."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


_NVIMGCODEC: list[ModuleType | None] = []


def nvimgcodec() -> ModuleType | None:
    """The ``nvidia.nvimgcodec`` module, or None where it is not installed (or broken)."""
    if not _NVIMGCODEC:
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")  # per-image errors are handled here
        try:
            with _quiet_stderr():
                from nvidia import nvimgcodec as mod
        except Exception:  # ImportError, or a CUDA runtime it cannot load
            mod = None
        _NVIMGCODEC.append(mod)
    return _NVIMGCODEC[0]


def _make_nvimgcodec_decoder(device: torch.device, *, kind: str = "any", options: str = "",
                             engine_share: float = 1.0):
    """An nvImageCodec decoder. ``kind``: ``'hardware'`` (the JPEG engines only) or
    ``'any'`` (the engines, then nvImageCodec's CUDA decoder); ``options``: nvImageCodec's
    decoder options string; ``engine_share`` below 1: at most that share of each batch goes
    to the engines (their backend's load hint) and the rest to the CUDA decoder, whatever
    ``kind``."""
    n = nvimgcodec()
    if device.type == "cuda":
        backends = [n.Backend(n.BackendKind.HW_GPU_ONLY, load_hint=engine_share)]
        if kind == "any" or engine_share < 1:
            backends.append(n.Backend(n.BackendKind.GPU_ONLY))
        dev = device.index if device.index is not None else torch.cuda.current_device()
    else:
        backends, dev = [n.Backend(n.BackendKind.CPU_ONLY)], n.NVIMGCODEC_DEVICE_CPU_ONLY
    with _quiet_stderr():
        return n.Decoder(device_id=dev, backends=backends, options=options)


_ENGINES: dict[int, bool] = {}  # device index -> answer of the probe


def has_jpeg_engines(device: torch.device) -> bool:
    """True where nvImageCodec is installed and decodes a JPEG on the GPU's hardware JPEG
    engines (A100/H100/H200 class), probed once per device by decoding one small image
    (making a decoder costs up to a second)."""
    if device.type != "cuda" or nvimgcodec() is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ENGINES:
        _ENGINES[index] = _probe_jpeg_engines(torch.device("cuda", index))
    return _ENGINES[index]


def _probe_jpeg_engines(device: torch.device) -> bool:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buf, format="JPEG", quality=90)
    try:
        dec = _make_nvimgcodec_decoder(device, kind="hardware")
        with _quiet_stderr():
            out = dec.decode([nvimgcodec().CodeStream(buf.getvalue())])
        return out[0] is not None
    except Exception:
        return False


def resolve_batch_decoder(name: str, device: torch.device) -> str:
    """'auto' -> the best batch decoder this machine has: ``nvimgcodec`` where the GPU has
    hardware JPEG engines, else ``nvjpeg`` on a GPU, else ``pil``. Explicit names are
    checked: a clear error if the machine cannot run them."""
    if name == "auto":
        if device.type != "cuda":
            return "pil"
        return "nvimgcodec" if has_jpeg_engines(device) else "nvjpeg"
    if name == "nvimgcodec" and nvimgcodec() is None:
        raise Stage1Error("--decoder nvimgcodec: nvImageCodec is not installed; "
                          "pip install 'nvidia-nvimgcodec-cu13[nvjpeg]', or use --decoder nvjpeg or pil")
    if name in BATCH_DECODERS and device.type != "cuda":
        raise Stage1Error(f"--decoder {name} needs a CUDA device; use --decoder pil on a CPU")
    return name


def resized_size(h: int, w: int, recipe: Preprocessing) -> tuple[int, int]:
    """Output size of the recipe's resize (torchvision's rule for an int size)."""
    if recipe.preset != "baseline":
        return recipe.resize, recipe.resize
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = recipe.resize, int(recipe.resize * long / short)
    return (new_short, new_long) if h <= w else (new_long, new_short)


def _consecutive(views: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``views`` as one slice of the ``(N, H, W, 3)`` buffer they are consecutive rows of
    (how :attr:`BatchPreprocessor.batch_buffers` returns a batch's images), else None."""
    first = views[0]
    base = first._base
    if base is None or base.dim() != 4 or tuple(base.shape[1:]) != tuple(first.shape) or not base.is_contiguous():
        return None
    per, start = first.numel(), first.storage_offset() - base.storage_offset()
    if start % per or any(v._base is not base or v.storage_offset() != first.storage_offset() + k * per
                          for k, v in enumerate(views)):
        return None
    return base[start // per:start // per + len(views)]


class DecoderPool:
    """Decoders not in use, handed out by priority: of the threads waiting, the one with
    the lowest ``priority`` (the earliest batch) gets the next free decoder; equal
    priorities in the order they asked. Batches then reach the model in the order it
    takes them, instead of a later batch's decode delaying the next one it needs."""

    def __init__(self) -> None:
        self._free: collections.deque = collections.deque()  # longest idle first
        self._waiting: list[tuple[float, int]] = []  # a heap
        self._order = itertools.count()
        self._cond = threading.Condition()

    def put(self, decoder) -> None:
        with self._cond:
            self._free.append(decoder)
            self._cond.notify_all()

    def empty(self) -> bool:
        with self._cond:
            return not self._free

    def get(self, priority: float = math.inf):
        with self._cond:
            me = (priority, next(self._order))
            heapq.heappush(self._waiting, me)
            try:
                while not (self._free and self._waiting[0] == me):
                    self._cond.wait()
            except BaseException:  # e.g. KeyboardInterrupt: leave the line, or the others wait for ever
                self._waiting.remove(me)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)
            decoder = self._free.popleft()
            if self._free and self._waiting:  # the next in line may take another one
                self._cond.notify_all()
            return decoder


class BatchPreprocessor:
    """``list of JPEG bytes`` -> ``(B, 3, S, S)`` normalised float tensor on ``device``.

    ``decoder``: ``'nvjpeg'`` (torchvision) or ``'nvimgcodec'``. One instance may be used
    from several threads: they share ``decoders`` nvImageCodec decoders, each one batch at a
    time (the JPEG engines are fed best by few decoders; beside the model two measured
    faster than one, benchmarks/NOTES.md)."""

    def __init__(self, recipe: Preprocessing, device: torch.device, *, decoder: str = "nvjpeg",
                 decode_stream: bool = True, decode_chunk: int = 0,
                 decoders: int = 2, decode_priority: bool = True, preallocate: bool = True,
                 decoder_options: str = "", engine_share: float = 1.0) -> None:
        if decoder not in BATCH_DECODERS:
            raise ValueError(f"decoder must be one of {BATCH_DECODERS}, got {decoder!r}")
        if decoder == "nvimgcodec" and nvimgcodec() is None:
            raise Stage1Error("nvImageCodec is not installed: pip install 'nvidia-nvimgcodec-cu13[nvjpeg]'")
        self.recipe, self.device, self.decoder = recipe, device, decoder
        # nvImageCodec on a GPU: decode on a stream of the calling thread's own, so the next
        # batch's decode is not ordered after this batch's resize (which shares the SMs with
        # the model); the decoded images are then held until the resize that reads them is done
        self.decode_stream = decode_stream and device.type == "cuda"
        self.decode_chunk = decode_chunk  # images per nvImageCodec call (0: the whole batch)
        self.decoders = decoders  # nvImageCodec decoders used side by side (each one batch at a time)
        # the decode stream at the highest priority: nvImageCodec waits on the host for each
        # group of images (one per JPEG engine core) before it starts the next, so its
        # kernels should not queue behind the model's (measured: within noise either way)
        self.decode_priority = decode_priority
        # the JPEG engines' memory pool made with the decoders, for images of the size of the
        # sample given to warm_up (else grown while decoding): in four A/B rounds beside
        # ViT-L/16, 0-28 % more files per second end to end (benchmarks/NOTES.md)
        self.preallocate = preallocate
        self.decoder_options = decoder_options  # nvImageCodec's options string for its decoders
        # share of each batch for the JPEG engines; the rest goes to nvImageCodec's CUDA decoder
        # on the SMs (more decode capacity, taken from the model; 85 % and 70 % measured no
        # faster for ViT-B/16, benchmarks/NOTES.md)
        self.engine_share = engine_share
        # a free decoder goes to the earliest batch waiting (False: first come, first served)
        self.batch_order = True
        # let CUDA's memory pool keep the decoded images' memory between batches instead of
        # returning it to the driver at every synchronisation (extract.mempool)
        self.keep_pool = True
        # nvImageCodec's images handed on as they are, (H, W, 3), and stacked whole by the resize
        # before its crop: no per-image permute and slice, Python the decode threads run under
        # the GIL (benchmarks/NOTES.md). False: (3, H, W) views, sliced one by one.
        self.hwc_views = True
        # nvImageCodec decodes the images whose size the header states into one buffer per size
        # and batch, allocated here and wrapped once per call, instead of allocating every image
        # itself and being wrapped back image by image (each of those steps gives up and retakes
        # the GIL in nvImageCodec, waiting for it while other threads run Python; NOTES.md)
        self.batch_buffers = True
        self._local = threading.local()
        self.compute_dtype = torch.float16 if device.type == "cuda" else torch.float32
        self._mats: dict[tuple[int, int], tuple[torch.Tensor | None, int, int]] = {}
        self._fp32_out = True
        self._nv_lock = threading.Lock()  # making the decoders; the fallback decoder
        self._nv_free = DecoderPool()  # decoders not in use
        self._nv_decoder = self._nv_params = self._nv_fallback = None
        self._nv_engines: bool | None = None  # hardware JPEG engines answer (probed on first use)
        self.mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1) * 255.0

    @property
    def layout(self) -> str:
        """How :meth:`decode` returns images: ``'hwc'`` (``(H, W, 3)``, nvImageCodec's own
        layout) or ``'chw'`` (``(3, H, W)``)."""
        return "hwc" if self.decoder == "nvimgcodec" and self.hwc_views else "chw"

    def chw(self, im: torch.Tensor) -> torch.Tensor:
        """A decoded image as a ``(3, H, W)`` view, whatever :attr:`layout`."""
        return im.permute(2, 0, 1) if self.layout == "hwc" else im

    def decode(self, datas: Sequence[bytes | bytearray], *, cpu: Sequence[bool] | None = None,
               sizes: Sequence[tuple[int, int] | None] | None = None,
               priority: float = math.inf) -> tuple[list[torch.Tensor | None], list[int]]:
        """Decoded uint8 images in :attr:`layout` (None where not decoded) and the positions
        that need the CPU path. ``cpu`` and ``sizes``: the :func:`jpeg_info` of each input,
        where the caller has it (read from the headers here otherwise). ``priority``: where
        this call queues for a free decoder (lower first; the pipeline's batch index)."""
        self._local.priority = priority
        out: list[torch.Tensor | None] = [None] * len(datas)
        if cpu is None or (sizes is None and self._buffered()):
            info = [jpeg_info(d) for d in datas]
            cpu, sizes = [c for c, _ in info], [hw for _, hw in info]
        flags = cpu
        cpu_pos = [i for i, f in enumerate(flags) if f]
        todo = [i for i, f in enumerate(flags) if not f]
        cpu = cpu_pos
        if todo and self.decoder == "nvimgcodec":
            hws = [sizes[i] for i in todo] if sizes is not None else None
            for i, im in zip(todo, self._decode_nvimgcodec([datas[i] for i in todo], hws), strict=True):
                if im is None:
                    cpu.append(i)
                else:
                    out[i] = im
        elif todo:
            tensors = [torch.frombuffer(datas[i], dtype=torch.uint8) for i in todo]
            try:
                imgs = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad file fails the call: decode one by one
                imgs = []
                for t in tensors:
                    try:
                        imgs.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        imgs.append(None)
            for i, im in zip(todo, imgs, strict=True):
                if im is None:
                    cpu.append(i)
                else:
                    out[i] = im
        return out, sorted(cpu)

    WARM_UP_PIXELS = 32 * 1280 * 720  # at most this many pixels per warm-up decode call
    # a larger first image sizes no memory pool: it is made before the batch size is chosen,
    # and one image per engine core of, say, 48 MP would take gigabytes
    PREALLOCATE_PIXELS = 2560 * 1440

    def warm_up(self, sample: bytes | bytearray | None = None, *, copies: int = 32, decode: bool = True) -> None:
        """Make the batch decoder(s) now (up to a second each for nvImageCodec) rather than
        in the first batch, with the JPEG engines' memory pool sized for a ``sample`` JPEG's
        size (e.g. the first input's) where one is given (``preallocate``). With ``decode``,
        also decode ``copies`` of the sample (fewer if large: ``WARM_UP_PIXELS``) with each
        decoder and resize them, so that the decoders' buffers, the resize weights for that
        size and the GPU libraries' handles are ready before the first batch.
        ``run_extract`` calls it with the first input while the model compiles; the pipeline
        calls it without (a no-op by then) while the first files are read."""
        usable = sample is not None and not needs_cpu(sample)
        if self.decoder == "nvimgcodec":
            with self._nv_lock:
                self._make_decoder(sample if usable else None)
        if not usable or not decode:
            return
        one = self.decode([sample])[0][0]
        if one is None:
            return
        # a large first image gets fewer copies: this memory is taken while the batch size
        # is chosen from the free memory
        h, w = self.chw(one).shape[-2:]
        copies = max(1, min(copies, self.WARM_UP_PIXELS // (h * w)))
        imgs: list[torch.Tensor | None] = [one]
        # nothing else decodes yet, so the pool hands out each of its decoders in turn
        for _ in range(max(1, self.decoders) if self.decoder == "nvimgcodec" else 1):
            imgs = self.decode([sample] * copies)[0]
        ok = [im for im in imgs if im is not None]
        if ok:
            self.transform(ok)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _make_decoder(self, sample: bytes | bytearray | None = None) -> None:
        """Under ``_nv_lock``. ``sample``: a JPEG the engines' memory pool is sized for."""
        if self._nv_decoder is None:
            n = nvimgcodec()
            options = self.decoder_options
            if self.preallocate and sample is not None:
                try:
                    cs = n.CodeStream(np.frombuffer(sample, dtype=np.uint8))
                    w, h = cs.width, cs.height
                except RuntimeError:  # unparsable: no hint
                    w = h = 0
                if 0 < w * h <= self.PREALLOCATE_PIXELS:
                    # room for one image of this size per engine core (nvImageCodec rounds the
                    # batch size up to the engines' mini-batch)
                    hints = {"width_hint": w, "height_hint": h, "batch_size": 1}
                    options = " ".join([options] + [f"nvjpeg_hw_decoder:preallocate_{k}={v}" for k, v in hints.items()])
            # Beside the model, a decoder that may use both the engines and the CUDA decoder
            # finished one batch a second (benchmarks/NOTES.md, H200): its work waited for
            # all compute queued on the GPU. One with the engines alone kept its rate, so
            # the batch goes to the engines alone and only what they refuse goes further.
            self._nv_engines = has_jpeg_engines(self.device)
            if self.keep_pool:
                keep_pool_memory(self.device)
            made = [_make_nvimgcodec_decoder(self.device, kind="hardware" if self._nv_engines else "any",
                                             options=options.strip(), engine_share=self.engine_share)
                    for _ in range(max(1, self.decoders))]
            for d in made:
                self._nv_free.put(d)
            self._nv_decoder = made[0]
            # EXIF-rotated files never get here (needs_cpu): decode the stored orientation
            self._nv_params = n.DecodeParams(apply_exif_orientation=False, color_spec=n.ColorSpec.SRGB)

    def _buffered(self) -> bool:
        return self.decoder == "nvimgcodec" and self.batch_buffers

    def _decode_nvimgcodec(self, datas: Sequence[bytes | bytearray],
                           sizes: Sequence[tuple[int, int] | None] | None = None) -> list[torch.Tensor | None]:
        """Batched nvImageCodec calls (``decode_chunk`` images each); uint8 images in
        :attr:`layout` (None: not decoded), ready in the current stream's order. ``sizes``:
        each input's ``(height, width)`` from its header (None: unknown), for
        :attr:`batch_buffers`."""
        n = nvimgcodec()
        cuda = self.device.type == "cuda"
        streams, pos = [], []
        # one CodeStream per image made here: handing nvImageCodec the raw bytes to parse
        # itself made each batch's decode call slower beside ViT-B/16 (benchmarks/NOTES.md)
        for k, d in enumerate(datas):
            try:
                streams.append(n.CodeStream(np.frombuffer(d, dtype=np.uint8)))
                pos.append(k)
            except RuntimeError:  # unparsable header
                pass
        out: list[torch.Tensor | None] = [None] * len(datas)
        if not streams:
            return out
        current = torch.cuda.current_stream(self.device) if cuda else None
        side = None
        if self.decode_stream:
            side = getattr(self._local, "decode_stream", None)
            if side is None:
                # torch maps a priority beyond the device's range to its highest
                side = self._local.decode_stream = torch.cuda.Stream(
                    self.device, priority=-100 if self.decode_priority else 0)
        stream = (side or current).cuda_stream if cuda else 0
        step = self.decode_chunk or len(streams)
        groups: dict[tuple[int, int], list[int]] = {}  # size -> indices into streams
        own = list(range(len(streams)))  # decoded into images nvImageCodec allocates
        if sizes is not None and self._buffered():
            for j, k in enumerate(pos):
                if sizes[k] is not None:
                    groups.setdefault(tuple(sizes[k]), []).append(j)
            own = [j for j in range(len(streams)) if sizes[pos[j]] is None]
        if groups:
            order, views, wrapped = [], [], []  # every group in one decode call
            for (h, w), idx in groups.items():
                # allocated in the decode stream's order: memory freed there earlier is not still
                # read by work queued elsewhere (the resize holds these views until it is done)
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    buf = torch.empty((len(idx), h, w, 3), dtype=torch.uint8, device=self.device)
                vs = buf.unbind(0)
                order += idx
                views += vs
                wrapped += n.as_images(list(vs) if cuda else [v.numpy() for v in vs], cuda_stream=stream)
            try:
                got: list = []
                for a in range(0, len(order), step):
                    got += self._decode_chunk([streams[j] for j in order[a:a + step]], stream,
                                              images=wrapped[a:a + step])
            except ValueError:  # a header that misstated a size: nvImageCodec allocates them all
                own, got = sorted(own + order), []
            for j, v, im in zip(order, views, got, strict=False):
                if im is not None:
                    out[pos[j]] = v if self.hwc_views else v.permute(2, 0, 1)
        imgs: list = []
        for a in range(0, len(own), step):
            imgs += self._decode_chunk([streams[j] for j in own[a:a + step]], stream)
        if side is not None:
            current.wait_stream(side)
        for j, im in zip(own, imgs, strict=True):
            if im is None:
                continue
            # zero-copy: __cuda_array_interface__ on the GPU, the array interface on the host;
            # the tensor keeps the image (and its buffer) alive
            t = torch.as_tensor(im, device=self.device) if cuda else torch.from_numpy(np.asarray(im))
            if t.dim() != 3 or t.shape[2] != 3:  # read from the view: no call into nvImageCodec
                continue
            out[pos[j]] = t if self.hwc_views else t.permute(2, 0, 1)
        return out

    def _decode_chunk(self, streams: list, cuda_stream: int, images: list | None = None) -> list:
        """One decode call; ``images``: nvImageCodec images to decode into (one per stream)."""
        with self._nv_lock:
            self._make_decoder()
        dec = self._take_decoder()
        extra = {} if images is None else {"images": images}
        try:
            imgs = list(dec.decode(streams, params=self._nv_params, cuda_stream=cuda_stream, **extra))
        finally:
            self._nv_free.put(dec)
        left = [k for k, im in enumerate(imgs) if im is None]
        if not left or not self._nv_engines:
            return imgs
        with self._nv_lock:
            # e.g. progressive JPEGs: a decoder that may also use the CUDA decoder; where
            # none can be made (seen: "Could not create decoder" for the CUDA decoder
            # alone), these images take the per-image CPU path
            if self._nv_fallback is None:
                try:
                    self._nv_fallback = _make_nvimgcodec_decoder(self.device, kind="any")
                except RuntimeError:
                    self._nv_fallback = False
            if self._nv_fallback is not False:
                extra = {} if images is None else {"images": [images[k] for k in left]}
                again = self._nv_fallback.decode([streams[k] for k in left], params=self._nv_params,
                                                 cuda_stream=cuda_stream, **extra)
                for k, im in zip(left, again, strict=True):
                    imgs[k] = im
        return imgs

    def _take_decoder(self):
        """A decoder not in use by another thread (waits for one, in priority order)."""
        return self._nv_free.get(getattr(self._local, "priority", math.inf) if self.batch_order else math.inf)

    def _hold(self, imgs: Sequence[torch.Tensor]) -> None:
        """Keep decoded images (buffers freed in the decode stream's order) until the work
        queued on the current stream, which reads them, is done; at most a few batches."""
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = collections.deque()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        held.append((event, list(imgs)))
        while held and (len(held) > 3 or held[0][0].query()):
            held[0][0].synchronize()
            held.popleft()

    def _axis(self, n_in: int, n_out: int) -> tuple[torch.Tensor | None, int, int]:
        """One axis of the resize+crop: ``(weights, start, stop)``. Only input samples
        ``start:stop`` reach a kept output; ``weights`` is ``(kept outputs, stop-start)``,
        or None where the axis is not resized (the crop is then just that slice)."""
        key = (n_in, n_out)
        if key not in self._mats:
            start, length = crop_box(n_out, self.recipe.crop)
            if n_out == n_in:
                self._mats[key] = (None, start, start + length)
            else:
                w = pil_weights(n_in, n_out, self.recipe.interpolation, start, length)
                nz = np.flatnonzero(np.abs(w).sum(0))
                a, b = int(nz[0]), int(nz[-1]) + 1
                # a multiple of 8 samples (zero weights beyond the support): the rows of the
                # GEMMs' operands are then 16-byte aligned, which the tensor-core kernels want
                # (unaligned, a third of the resize's GPU time went to an align-1 kernel)
                pad = min(-(b - a) % self.ALIGN, n_in - (b - a))  # samples to add, where the image has them
                end = min(pad, n_in - b)  # after the support first, the rest before it
                a, b = a - (pad - end), b + end
                self._mats[key] = (torch.from_numpy(w[:, a:b]).to(self.device, self.compute_dtype), a, b)
        return self._mats[key]

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` (2-D or batched) with float32 results: on a GPU, float16 operands on
        the tensor cores accumulating into float32 output (no float16 rounding of sums)."""
        if self.device.type == "cuda" and self._fp32_out:
            try:
                return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)
            except (TypeError, RuntimeError):  # torch without mm(..., out_dtype)
                self._fp32_out = False
        return torch.matmul(a, b).float()

    ALIGN = 8  # input samples per resize axis rounded up to a multiple of this (see _axis)
    STACK_BYTES = 256 << 20  # at most this much of whole images stacked at once (layout 'hwc')

    def transform(self, imgs: Sequence[torch.Tensor], *, chunk: int = 64, layout: str | None = None) -> torch.Tensor:
        """Resize, crop and normalise decoded uint8 images (any strides): ``(3, H, W)``, or
        ``(H, W, 3)`` with ``layout='hwc'`` (default: :attr:`layout`).

        PIL's two resize passes as two GEMMs per group of same-size images
        (:mod:`extract.resample`), over only the input pixels that reach the crop and
        computing only the pixels the crop keeps, rounded to 8 bits after each pass as PIL
        does; float16 operands on a GPU (0..255 integers are exact in it), float32 on a
        CPU. Groups are processed ``chunk`` images at a time; ``(H, W, 3)`` images are
        stacked whole (at most ``STACK_BYTES`` at once) and cropped as one batch."""
        r = self.recipe
        s = r.output_size
        hwc = (layout or self.layout) == "hwc"
        out = torch.empty((len(imgs), 3, s, s), device=self.device, dtype=torch.float32)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(imgs):
            groups.setdefault(tuple(im.shape[:2] if hwc else im.shape[-2:]), []).append(i)
        for (h, w), idx in groups.items():
            nh, nw = resized_size(h, w, r)
            mh, r0, r1 = self._axis(h, nh)  # (ch, R)
            mw, c0, c1 = self._axis(w, nw)  # (cw, C)
            order = ("w", "h") if horizontal_first(h, w, nh, nw) else ("h", "w")
            step_n = max(1, min(chunk, self.STACK_BYTES // (h * w * 3))) if hwc else chunk
            for k0 in range(0, len(idx), step_n):
                part = idx[k0:k0 + step_n]
                b = len(part)
                # (b, R, 3, C): rows of pixels, channel-major inside a row, as the GEMMs want
                if hwc:
                    run = _consecutive([imgs[i] for i in part])  # rows of one decode buffer: no copy
                    x = run if run is not None else torch.stack([imgs[i] for i in part])
                    x = x[:, r0:r1, c0:c1].permute(0, 1, 3, 2)
                else:
                    x = torch.stack([imgs[i][:, r0:r1, c0:c1] for i in part]).permute(0, 2, 1, 3)
                x = x.to(self.compute_dtype, memory_format=torch.contiguous_format)
                for step, axis in enumerate(order):
                    rows, cols = x.shape[1], x.shape[3]
                    if axis == "w" and mw is not None:  # horizontal: (b*rows*3, C) @ (C, cw)
                        x = round_like_pil(self._mm(x.view(b * rows * 3, cols), mw.T)).view(b, rows, 3, -1)
                    elif axis == "h" and mh is not None:  # vertical: (ch, R) @ (b, R, 3*cols)
                        x = round_like_pil(self._mm(mh.expand(b, -1, -1), x.view(b, rows, 3 * cols)))
                        x = x.view(b, -1, 3, cols)
                    if step == 0 and x.dtype != self.compute_dtype:
                        x = x.to(self.compute_dtype)  # integers 0..255: exact
                out[part] = (x.permute(0, 2, 1, 3).float() - self.mean) / self.std
        if self.decode_stream and self.decoder == "nvimgcodec":
            self._hold(imgs)
        return out
