"""``format="dense"``: stock ``save_pretrained`` (zeros stored densely; loads anywhere)."""

from hfprune.formats.base import register_format


class DenseFormat:
    def validate(self, model, bits, group_size, record) -> None:
        if bits is not None or group_size is not None:
            raise ValueError(
                "format='dense' stores the weights as they are and does not quantize: drop bits/group_size, or use "
                "format='sparse' (compressed sparse + int8/int4) or format='compressed-tensors' (int8/int4 for vLLM).")

    def save(self, model, directory, *, record, bits, group_size, max_shard_size) -> None:
        model.save_pretrained(directory, max_shard_size=max_shard_size)


register_format("dense", DenseFormat())
