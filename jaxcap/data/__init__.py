"""Data: captions and vocabulary, the synthetic shapes and COCO data sets (TFDS), images, batches."""


def keep_tensorflow_on_cpu() -> None:
    """Hides every GPU from TensorFlow, which TFDS runs to build a data set: JAX holds the accelerators.

    Called just before a build, not at start-up: importing TensorFlow takes ~4 s,
    and nothing else needs it (reading a built data set does not). TensorFlow
    refuses the change once it has started its devices; it was then made by an
    earlier build in this process, or TensorFlow was started by the user's code.
    """
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # "Visible devices cannot be modified after being initialized"
        pass


def download_and_prepare(builder, **kwargs) -> None:
    """`builder.download_and_prepare(**kwargs)`, with TensorFlow kept off the GPUs if it builds."""
    if not builder.is_prepared():
        keep_tensorflow_on_cpu()
    builder.download_and_prepare(**kwargs)
