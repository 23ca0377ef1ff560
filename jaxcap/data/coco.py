"""MS-COCO 2014 captions through TFDS (`coco_captions/2014`, the Karpathy & Li splits).

Splits: train (82,783 images), restval (30,504), val (5,000), test (5,000); about 5
captions per image (616,767 for 123,287 images). TFDS split expressions work as
usual: 'train+restval', 'train[:1000]'.

Preparing the data set is a separate, explicit step (training never starts a
40 GB download by surprise)::

    python -m jaxcap.data.coco [--data_dir=DIR] [--manual_dir=DIR]

It downloads what TFDS' coco_captions needs (`REQUIRED_FILES`, ~40 GB: every COCO
2014 zip, although only train2014 and val2014 images end up in the splits) unless
the files are already in `manual_dir` (TFDS' default: `<data_dir>/downloads/manual`),
extracts them and writes the splits as array_record (~20 GB; up to ~100 GB of disk
while it runs; `<data_dir>/downloads` can be deleted afterwards). `--data_dir` is
`config.data.tfds_dir` ('' = TFDS' default, ~/tensorflow_datasets) and
`--manual_dir` is `config.data.manual_dir`.

A record of `load_source(...)` is::

    {'image': uint8 HxWx3 (image_size squares, or the stored size; grayscale and
               CMYK JPEGs become RGB),
     'image_id': int (COCO's image id),
     'captions': list of bytes (UTF-8, as written by the annotators)}
"""

from __future__ import annotations

import argparse
import inspect
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from jaxcap import data as data_lib
from jaxcap.data import images

NAME = 'coco_captions/2014'
FILE_FORMAT = 'array_record'

# What TFDS' coco_captions/2014 fetches (the base `coco/2014` builder downloads every
# 2014 split, test sets included). TFDS uses a file from manual_dir instead of
# downloading it when the name matches and the checksum is the registered one.
REQUIRED_FILES = (
    'http://images.cocodataset.org/zips/train2014.zip',
    'http://images.cocodataset.org/zips/val2014.zip',
    'http://images.cocodataset.org/zips/test2014.zip',
    'http://images.cocodataset.org/zips/test2015.zip',
    'http://images.cocodataset.org/annotations/annotations_trainval2014.zip',
    'http://images.cocodataset.org/annotations/image_info_test2014.zip',
    'http://images.cocodataset.org/annotations/image_info_test2015.zip',
    'https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip',
)

Record = dict[str, Any]


class NotPreparedError(FileNotFoundError):
    """The data set is not in the TFDS data dir in a random-access format."""


def load_source(split: str, data_dir: str, manual_dir: str = '',
                image_size: int | None = None) -> CocoRecords:
    """Random access to a prepared split (expression), e.g. 'train+restval' or 'val'.

    Args:
        split: TFDS split or split expression.
        data_dir: TFDS data dir that holds (or will hold) `coco_captions`.
        manual_dir: TFDS' manual_dir, only named in the error message ('' =
            TFDS' default, `<data_dir>/downloads/manual`).
        image_size: images come resized to image_size x image_size (decoded at
            a reduced scale where they are large enough: `images.decode`);
            None: at their stored size.

    Returns:
        The records of `split` (see the module docstring), read lazily.

    Raises:
        NotPreparedError: the data set is not prepared in `data_dir`, or only in
            a format without random access; the message says what to run.
        ValueError: `split` names no split of the data set.
    """
    import tensorflow_datasets as tfds  # heavy import, only when needed
    builder = make_builder(data_dir)
    if not builder.is_prepared():
        raise NotPreparedError(not_prepared_message(data_dir, manual_dir))
    formats = {f.value for f in builder.info.available_file_formats()}
    if FILE_FORMAT not in formats:
        raise NotPreparedError(
            f'{NAME} in {builder.data_dir} is stored as {", ".join(sorted(formats))}, which has '
            f'no random access; jaxcap reads {FILE_FORMAT}. Delete that directory and run '
            f'`{prepare_command(data_dir, manual_dir)}`, or point config.data.tfds_dir elsewhere.')
    # Images stay encoded in the TFDS records: CocoRecords decodes them itself
    # (always to RGB) and `metadata` reads a record without decoding at all.
    source = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()},
                                    file_format=FILE_FORMAT)
    return CocoRecords(source, image_size)


def make_builder(data_dir: str):
    """The TFDS builder of coco_captions/2014 in `data_dir` (nothing is read or written yet)."""
    import tensorflow_datasets as tfds
    return tfds.builder(NAME, data_dir=os.path.expanduser(data_dir))


def prepare(data_dir: str, manual_dir: str = ''):
    """Downloads (unless in `manual_dir`), extracts and writes the data set as array_record.

    Does nothing if it is already prepared.

    Args:
        data_dir: TFDS data dir.
        manual_dir: where pre-downloaded `REQUIRED_FILES` are ('' = TFDS'
            default, `<data_dir>/downloads/manual`).

    Returns:
        The prepared TFDS builder.
    """
    import tensorflow_datasets as tfds
    _give_builder_a_code_path()
    builder = make_builder(data_dir)
    config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir) if manual_dir else None,
        # The GCS mirror holds TFRecord files, which have no random access.
        try_download_gcs=False)
    data_lib.download_and_prepare(builder, file_format=FILE_FORMAT, download_config=config)
    return builder


def _give_builder_a_code_path() -> None:
    """Lets TFDS find coco_captions' registered checksums (needed to use manual_dir).

    TFDS 4.9.10 locates a builder's source through `importlib_resources`, which it
    does not install on Python >= 3.9 (tensorflow/datasets#11212); pyproject.toml
    declares it, but where it is missing preparing fails with ModuleNotFoundError.
    The path TFDS would compute is the module's file, so give it directly.
    """
    from etils import epath
    from tensorflow_datasets.object_detection import coco_captions
    cls = coco_captions.CocoCaptions
    if 'code_path' not in vars(cls):  # a plain class attribute shadows TFDS' classproperty
        cls.code_path = epath.Path(inspect.getfile(cls))


def prepare_command(data_dir: str, manual_dir: str = '') -> str:
    """The shell command that prepares the data set in `data_dir`."""
    command = f'python -m jaxcap.data.coco --data_dir={data_dir}'
    return command + (f' --manual_dir={manual_dir}' if manual_dir else '')


def not_prepared_message(data_dir: str, manual_dir: str = '') -> str:
    """What to run, and where to put pre-downloaded files, when the data set is missing."""
    manual = manual_dir or os.path.join(data_dir, 'downloads', 'manual')
    names = ', '.join(url.rsplit('/', 1)[1] for url in REQUIRED_FILES)
    return (
        f'MS-COCO captions (TFDS {NAME}) is not prepared in {data_dir} '
        '(config.data.tfds_dir). Prepare it once, with network access (~40 GB to download, '
        'up to ~100 GB of disk while it runs, ~20 GB after; hours):\n'
        f'    {prepare_command(data_dir, manual_dir)}\n'
        f'Offline, download these files elsewhere and copy them into {manual} (TFDS\' '
        f'manual_dir, config.data.manual_dir) first; the command then uses them instead of '
        f'downloading: {names} (from images.cocodataset.org/zips/, /annotations/ and '
        'cs.stanford.edu/people/karpathy/deepimagesent/).')


class CocoRecords(Sequence):
    """A TFDS coco_captions source seen as {'image', 'image_id', 'captions'} records.

    Random access, nothing loaded ahead; pickles (for grain workers) with the
    TFDS source. Expects the TFDS source to leave 'image' encoded (SkipDecoding).
    Images come resized to `image_size` squares, or at their stored size (None).
    """

    def __init__(self, tfds_source: Sequence[Record], image_size: int | None = None):
        self._source = tfds_source
        self._image_size = image_size

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        raw = self._source[self._row(index)]
        return {'image': decode_image(raw['image'], self._image_size), **_text_fields(raw)}

    def metadata(self, index: int) -> Record:
        """Record `index` without its image ('image_id', 'captions'): no JPEG decoding."""
        return _text_fields(self._source[self._row(index)])

    def _row(self, index: int) -> int:
        row = int(index)
        row = row + len(self) if row < 0 else row
        if not 0 <= row < len(self):  # Sequence's iteration stops on IndexError
            raise IndexError(f'Index {index} out of range for {len(self)} records.')
        return row


def _text_fields(raw: Record) -> Record:
    """COCO's {'image/id', 'captions': {'text', 'id'}} as {'image_id', 'captions'}."""
    return {'image_id': int(raw['image/id']), 'captions': list(raw['captions']['text'])}


def decode_image(data: bytes, size: int | None = None) -> np.ndarray:
    """JPEG (or any PIL-readable) bytes -> uint8 HxWx3 RGB, size x size if given.

    COCO holds grayscale and a few CMYK JPEGs; TFDS' own decoding would return
    them as-is (HxWx3 replicated gray, but HxWx4 CMYK), so decode here instead,
    as users' images are (`images.decode`). Pixels are taken as stored (no EXIF
    rotation), as TFDS and TensorFlow read them.
    """
    with Image.open(io.BytesIO(data)) as image:
        return images.decode(image, size, exif_orientation=False)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m jaxcap.data.coco`: prepares the data set, then prints the split sizes."""
    parser = argparse.ArgumentParser(prog='python -m jaxcap.data.coco',
                                     description=__doc__.split('\n\n', 1)[0])
    parser.add_argument('--data_dir', default='',
                        help="TFDS data dir (config.data.tfds_dir); '' = TFDS' default")
    parser.add_argument('--manual_dir', default='',
                        help="pre-downloaded zips (config.data.manual_dir); "
                             "'' = <data_dir>/downloads/manual")
    args = parser.parse_args(argv)
    import tensorflow_datasets as tfds
    data_dir = os.path.expanduser(args.data_dir) if args.data_dir else tfds.core.constants.DATA_DIR
    builder = prepare(data_dir, args.manual_dir)
    sizes = ', '.join(f'{name} {split.num_examples}' for name, split in builder.info.splits.items())
    print(f'{NAME} is ready in {builder.data_dir}: {sizes}')


if __name__ == '__main__':
    main()
