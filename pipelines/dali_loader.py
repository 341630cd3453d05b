"""The DALI loader: our sample plan drives a DALI graph through a batch-mode external source.

DALI's readers own their epoch (shuffle buffer, shard rotation), which would tie the sample
order and the crops to DALI's RNG and to the world size. Here the plan owns the epoch instead:
`PlanSource` hands DALI, for iteration `i` of the current epoch, the encoded files of this
rank's batch `start_batch + i`, their crop geometry and their labels/indices; DALI decodes,
crops, resizes and normalizes. The last batch may be smaller than the others (external source
batches may vary in size), so no sample is dropped or repeated beyond the rank padding.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from nvidia.dali.backend import TensorGPU
from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

from .batch import BatchFinisher, PlannedLoader
from .crop_plan import CropPlan, center_crop_rois
from .dali_pipelines import eval_pipeline, train_pipeline
from .datasets import DatasetIndex
from .replacement import SampleReplacer
from .sampling import ShardPlan
from .settings import ImageSettings, parse_rand_augment


class PlanSource:
    """External-source callback: `BatchInfo.iteration` -> the inputs of one planned batch.

    DALI calls it on the thread that runs the pipeline, which is the training thread; the
    files of the next `read_ahead` batches are therefore read by a background thread (file
    reads release the GIL), so the callback finds their bytes waiting."""

    def __init__(self, index: DatasetIndex, plan: ShardPlan, settings: ImageSettings,
                 crop_plan: CropPlan | None, replacer: SampleReplacer, read_ahead: int = 2):
        self.index, self.plan, self.settings, self.crop_plan = index, plan, settings, crop_plan
        self.replacer = replacer
        self.batches, self.epoch = [], 0
        self.read_ahead = read_ahead
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastkd-read")
        self._reads: dict[int, Future] = {}

    def start(self, epoch: int, start_batch: int) -> None:
        self.stop()
        self.epoch = epoch
        self.batches = list(self.plan.batches(epoch, start_batch))

    def stop(self) -> None:
        """Make every further request end the epoch (used to abandon an epoch midway)."""
        self.batches = []
        for future in self._reads.values():
            future.cancel()
        self._reads = {}

    def close(self) -> None:
        self.stop()
        self._reader.shutdown(wait=False, cancel_futures=True)

    def _read(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(the samples used, their bytes): a broken file's sample is replaced."""
        used, encoded = zip(*(self.replacer.read_bytes(int(i)) for i in ids))
        return np.asarray(used, dtype=np.int64), list(encoded)

    def _encoded(self, iteration: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """This batch's samples and file bytes, with the reads of the next batches started."""
        for ahead in range(iteration, min(iteration + 1 + self.read_ahead, len(self.batches))):
            if ahead not in self._reads:
                self._reads[ahead] = self._reader.submit(self._read, self.batches[ahead][0])
        return self._reads.pop(iteration).result()

    def __call__(self, info):
        if info.iteration >= len(self.batches):
            raise StopIteration
        planned, indices = self.batches[info.iteration]
        ids, encoded = self._encoded(info.iteration)
        indices = np.where(indices >= 0, ids, indices)   # a replaced sample reports its own index
        labels = self.index.labels[ids]
        heights, widths = self.index.heights[ids], self.index.widths[ids]
        if self.crop_plan is None:
            start, end = center_crop_rois(heights, widths, self.settings.img_size,
                                          self.settings.eval_resize)
            return encoded, start, end, labels, indices
        win = self.crop_plan.windows(self.epoch, ids, heights, widths)
        anchor = np.stack([win.top, win.left], axis=1).astype(np.float32)
        shape = np.stack([win.height, win.width], axis=1).astype(np.float32)
        return encoded, anchor, shape, win.flip.astype(np.int32), labels, indices


class DaliLoader(PlannedLoader):
    """DALI-backed loader; see `fastkd.pipelines.build_loader` for the contract."""

    def __init__(self, index: DatasetIndex, plan: ShardPlan, settings: ImageSettings, data, *,
                 crop_plan: CropPlan | None, finisher: BatchFinisher, device: torch.device,
                 on_gpu: bool, amp_dtype: torch.dtype | None, channels_last: bool):
        super().__init__(index, plan, finisher, device)
        self.kind = "dali-gpu" if on_gpu else "dali-cpu"
        self.channels_last, self.on_gpu = channels_last, on_gpu
        self._in_flight = False   # an epoch was left before DALI reported its end
        depth = data.prefetch or (3 if on_gpu else 2)   # batches prepared ahead of the step
        self.source = PlanSource(index, plan, settings, crop_plan, self.replacer,
                                 read_ahead=depth)
        common = dict(source=self.source, settings=settings, on_gpu=on_gpu,
                      prefetch_queue_depth=depth,
                      hw_decoder_load=data.hw_decoder_load,
                      fp16=amp_dtype == torch.float16, channels_last=channels_last,
                      batch_size=plan.batch_size, num_threads=max(1, data.num_workers),
                      device_id=_cuda_index(device) if on_gpu else None,
                      seed=(crop_plan.seed * 1_000_003 + plan.rank) % 2**31 if crop_plan else 0)
        if crop_plan is None:
            self.pipe = eval_pipeline(**common)
        else:
            spec = parse_rand_augment(data.auto_augment) if data.auto_augment else None
            self.pipe = train_pipeline(**common, rand_augment=spec, color_jitter=data.color_jitter)
        self.pipe.build()

    def __iter__(self):
        if self._in_flight:
            self._abandon_epoch()
        self.source.start(self.epoch, self.start_batch)
        self._in_flight = True
        for batch_no in range(self.start_batch, len(self.plan)):
            images, labels, indices = (self._to_torch(out) for out in self._run())
            if self.channels_last:   # NHWC -> a channels_last NCHW view, without a copy
                images = images.permute(0, 3, 1, 2)
            yield self.finisher(images, labels, indices, self.epoch, batch_no)
        self._end_epoch()

    def _run(self):
        """One batch. A GPU pipeline runs on torch's current CUDA stream, as DALI's own
        framework iterators do, so its outputs are ordered before the step's kernels on the
        device, without the host waiting for them."""
        if not self.on_gpu:
            return self.pipe.run()
        return self.pipe.run(torch.cuda.current_stream(self.device).cuda_stream)

    def close(self) -> None:
        self.source.close()

    def _end_epoch(self) -> None:
        """Consume DALI's end-of-epoch signal and rewind it for the next `__iter__`."""
        try:
            self._run()
        except StopIteration:
            self.pipe.reset()
            self._in_flight = False
            return
        raise RuntimeError("the DALI pipeline produced more batches than planned")

    def _abandon_epoch(self) -> None:
        """An iteration was left midway: drain the few prefetched batches, then rewind."""
        self.source.stop()
        while True:
            try:
                self._run()
            except StopIteration:
                break
        self.pipe.reset()
        self._in_flight = False

    def _to_torch(self, out) -> torch.Tensor:
        """One pipeline output (GPU images, or CPU images/labels/indices) on `self.device`."""
        tensor = out.as_tensor()
        # The dynamic executor (DALI's default) never recycles a buffer that is still
        # referenced, so DLPack hands it over without a copy, as DALI's own PyTorch iterator
        # does; the legacy executor reuses its buffers on the next run. Host outputs of a GPU
        # pipeline may be in pinned memory, from which the asynchronous upload could outlive
        # the buffer: those (labels and indices, a few bytes) go through a pageable copy.
        copy = not self.pipe.exec_dynamic or (self.on_gpu and not isinstance(tensor, TensorGPU))
        return to_torch_tensor(tensor, copy=copy).to(self.device, non_blocking=True)


def _cuda_index(device: torch.device) -> int:
    """A bare "cuda" means the current device (set per local rank by the launcher), not GPU 0."""
    return device.index if device.index is not None else torch.cuda.current_device()
