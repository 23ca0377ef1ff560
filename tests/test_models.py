"""Model structure: shapes, parameter counts, scan == unroll, causality, attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap.models import captioner, resnet
from jaxcap.models import decoder as decoder_lib
from jaxcap.models.attention import BahdanauAttention, attend_projected
from jaxcap.models.decoder import Decoder, LSTMCell


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_reference_decoder_has_the_keras_parameter_count():
    # The reference on cached (49, 2048) features, vocabulary 5000:
    #   project   2048*256 + 256                      =   524,544
    #   embedding 5000*256                             = 1,280,000
    #   attention W1 256*512+512, W2 512*512+512, V 513 =   394,753
    #   lstm1     (256+256)*2048 + 512*2048 + 2048      = 2,099,200
    #   lstm2     512*2048 + 512*2048 + 2048            = 2,099,200
    #   logits    512*5000 + 5000                       = 2,565,000
    #   total                                           = 8,962,697
    model = captioner.Captioner(vocab_size=5000, stage_sizes=())
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 7, 7, 2048)),
                            jnp.zeros((1, 34), jnp.int32))
    assert _count(shapes['params']) == 8_962_697


def test_reference_decoder_keeps_the_keras_parameter_layout():
    # Checkpoints and converted Keras weights are addressed by these paths and
    # shapes; the fused/sliced step must not change them. lstm1's kernel reads
    # [context (256), word (256)], in that order.
    model = captioner.Captioner(vocab_size=5000, stage_sizes=())
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 7, 7, 2048)),
                            jnp.zeros((1, 34), jnp.int32))
    flat = {jax.tree_util.keystr(path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes['params'])[0]}
    d = "['decoder']"
    assert flat == {
        "['project']['kernel']": (2048, 256), "['project']['bias']": (256,),
        f"{d}['embedding']['embedding']": (5000, 256),
        f"{d}['attention']['W1']['kernel']": (256, 512), f"{d}['attention']['W1']['bias']": (512,),
        f"{d}['attention']['W2']['kernel']": (512, 512), f"{d}['attention']['W2']['bias']": (512,),
        f"{d}['attention']['V']['kernel']": (512, 1), f"{d}['attention']['V']['bias']": (1,),
        f"{d}['lstm1']['kernel']": (512, 2048), f"{d}['lstm1']['recurrent_kernel']": (512, 2048),
        f"{d}['lstm1']['bias']": (2048,),
        f"{d}['lstm2']['kernel']": (512, 2048), f"{d}['lstm2']['recurrent_kernel']": (512, 2048),
        f"{d}['lstm2']['bias']": (2048,),
        f"{d}['logits']['kernel']": (512, 5000), f"{d}['logits']['bias']": (5000,),
    }


def test_resnet50_has_the_keras_parameter_count_and_grid():
    # Keras ResNet50(include_top=False): 23,587,712 weights, of which 53,120 are
    # BatchNorm moving means/variances (non-trainable) -> 23,534,592 trainable.
    model = resnet.ResNet50()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert _count(shapes['params']) == 23_534_592
    assert _count(shapes['batch_stats']) == 53_120
    out = jax.eval_shape(model.apply, shapes, jnp.zeros((2, 224, 224, 3)))
    assert out.shape == (2, 7, 7, 2048)
    # Keras layer names, so converted weights map one to one.
    assert {'conv1_conv', 'conv1_bn', 'conv2_block1', 'conv5_block3'} <= set(shapes['params'])
    assert set(shapes['params']['conv3_block1']) == {
        '0_conv', '0_bn', '1_conv', '1_bn', '2_conv', '2_bn', '3_conv', '3_bn'}


@pytest.mark.parametrize('train, train_stages', [(False, 0), (True, 1), (True, -1)])
def test_resnet_computes_only_what_the_next_stage_reads_and_gets_the_same_grid(train, train_stages):
    # A stage's last block, in inference mode, computes its output at every other row and
    # column only: what the next stage's strided 1x1 convs read. Asked for every stage's
    # output, the network computes them whole. Stage 1 ends on a projection shortcut,
    # stage 2 on an identity; 36 px gives odd grids (9 -> 5 -> 3).
    model = resnet.ResNet(stage_sizes=(1, 2, 1), num_filters=4, train_stages=train_stages)
    x = jax.random.normal(jax.random.key(0), (2, 36, 36, 3))
    variables = model.init(jax.random.key(1), x)
    # Nonzero biases and BatchNorm statistics, so that every position's values differ.
    variables = jax.tree.map(lambda v: v + jax.random.uniform(jax.random.key(2), v.shape, minval=0.1),
                             variables)
    grid, stats = model.apply(variables, x, train=train, mutable=['batch_stats'])
    stages, whole_stats = model.apply(variables, x, train=train, return_stages=True,
                                      mutable=['batch_stats'])
    assert [s.shape[1] for s in stages] == [9, 5, 3]
    np.testing.assert_allclose(grid, stages[-1], rtol=1e-6, atol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), stats, whole_stats)


def test_small_encoder_gives_an_8x8_grid_at_64px():
    model = captioner.Captioner(vocab_size=30, stage_sizes=(1, 1), num_filters=4, preprocess='unit',
                                embed_dim=8, units=16, attention_units=8)
    images = jnp.zeros((3, 64, 64, 3), jnp.uint8)
    tokens = jnp.zeros((3, 5), jnp.int32)
    variables = captioner.init_variables(model, 0, images, tokens)
    logits, alpha = jax.jit(model.apply)(variables, images, tokens)
    assert logits.shape == (3, 5, 30)
    assert alpha.shape == (3, 5, 64)   # 64 px / 2 (stem) / 2 (pool) / 2 (stage 2) = 8x8 regions
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)


def _decoder_and_inputs(seed=0, batch=3, regions=6, steps=7, vocab=11):
    decoder = Decoder(vocab_size=vocab, embed_dim=8, units=16, attention_units=12)
    k1, k2 = jax.random.split(jax.random.key(seed), 2)
    features = jax.random.normal(k1, (batch, regions, 8))
    tokens = jax.random.randint(k2, (batch, steps), 0, vocab)
    variables = captioner.init_variables(decoder, seed, features, tokens)
    return decoder, variables, features, tokens


def test_scan_equals_a_python_loop_over_the_same_cell():
    decoder, variables, features, tokens = _decoder_and_inputs()
    logits, alpha = jax.jit(decoder.apply)(variables, features, tokens)

    @jax.jit
    def unrolled_apply(variables):
        return unrolled(decoder.bind(variables))

    def unrolled(d):
        state = d.initial_state(tokens.shape[0])
        keys = d.attention_keys(features)
        out_logits, out_alpha = [], []
        for t in range(tokens.shape[1]):
            state, step_logits, a = d.step(state, tokens[:, t], features, keys)
            out_logits.append(step_logits)
            out_alpha.append(a)
        return jnp.stack(out_logits, 1), jnp.stack(out_alpha, 1)

    loop_logits, loop_alpha = unrolled_apply(variables)
    np.testing.assert_allclose(logits, loop_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha, loop_alpha, rtol=1e-5, atol=1e-7)


def _unrolled_step_loss(decoder, features, tokens, weights_logits, weights_alpha):
    """A loss of logits and attention, through a Python loop over `Decoder.step` (autodiff)."""
    def loss(variables):
        d = decoder.bind(variables)
        state, keys = d.initial_state(tokens.shape[0]), d.attention_keys(features)
        total = 0.0
        for t in range(tokens.shape[1]):
            state, logits, alpha = d.step(state, tokens[:, t], features, keys)
            total += jnp.sum(logits * weights_logits[:, t]) + jnp.sum(alpha * weights_alpha[:, t])
        return total
    return loss


def test_hand_written_backward_pass_equals_autodiff_through_the_step():
    # Teacher forcing runs `recurrence`, whose gradient is written by hand (weight
    # gradients as one matmul over all steps); decoding runs `step`, which autodiff
    # differentiates. Both must agree, for the logits' and the attention's gradients.
    decoder, variables, features, tokens = _decoder_and_inputs(steps=5)
    k1, k2 = jax.random.split(jax.random.key(7))
    weights_logits = jax.random.normal(k1, tokens.shape + (11,))
    weights_alpha = jax.random.normal(k2, tokens.shape + (6,))

    def scan_loss(variables, features):
        logits, alpha = decoder.apply(variables, features, tokens)
        return jnp.sum(logits * weights_logits) + jnp.sum(alpha * weights_alpha)

    def loop_loss(variables, features):
        return _unrolled_step_loss(decoder, features, tokens, weights_logits, weights_alpha)(variables)

    scan_value, scan_grads = jax.jit(jax.value_and_grad(scan_loss, argnums=(0, 1)))(variables, features)
    loop_value, loop_grads = jax.jit(jax.value_and_grad(loop_loss, argnums=(0, 1)))(variables, features)
    np.testing.assert_allclose(scan_value, loop_value, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(loop_grads))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(scan_grads)[0],
                                 jax.tree.leaves(loop_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    # The V bias gets no gradient at all (softmax ignores a shift), so check that
    # every other parameter really was exercised.
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(scan_grads[0]['params']['lstm1']))


@pytest.mark.parametrize('max_phases', [8, 2])
def test_teacher_forcing_with_steps_computes_what_a_loss_reads_and_nothing_else(max_phases,
                                                                                 monkeypatch):
    # With `steps_B`, the steps after a row's own count are not computed: rows
    # are sorted by it, the loop runs in phases of fewer rows (20, 12 and 4
    # here; 20 and 4 with at most 2 phases), and the weight gradients sum only
    # the live steps. What is computed, and the gradient of any loss over it,
    # must be the full recurrence's; the rest comes out zero. Unsorted counts,
    # including 0 and all T.
    monkeypatch.setattr(decoder_lib, 'MAX_PHASES', max_phases)
    assert len(decoder_lib.phase_rows(20)) == min(3, max_phases)
    batch, steps = 20, 7
    decoder, variables, features, tokens = _decoder_and_inputs(seed=3, batch=batch, steps=steps)
    steps_B = jnp.asarray([3, 7, 0, 5, 1, 7, 2, 6, 4, 4, 1, 0, 7, 3, 5, 2, 6, 1, 3, 2])
    live_BxT = np.arange(steps)[None, :] < np.asarray(steps_B)[:, None]
    k1, k2 = jax.random.split(jax.random.key(11))
    weights_h = jax.random.normal(k1, (batch, steps, 16))
    weights_a = jax.random.normal(k2, (batch, steps, 6))

    def loss(variables, features, steps_B):
        hidden, alpha = decoder.apply(variables, features, tokens, steps_B,
                                      method=Decoder.hidden_states)
        live = live_BxT[..., None]
        value = (jnp.sum(jnp.where(live, hidden * weights_h, 0.0))
                 + jnp.sum(jnp.where(live, alpha * weights_a, 0.0)))
        return value, (hidden, alpha)

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    full_run = jax.jit(lambda variables, features: grad(variables, features, None))
    (full, (hidden_full, alpha_full)), grads_full = full_run(variables, features)
    (value, (hidden, alpha)), grads = jax.jit(grad)(variables, features, steps_B)

    np.testing.assert_allclose(value, full, rtol=1e-5)
    np.testing.assert_allclose(hidden[live_BxT], hidden_full[live_BxT], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha[live_BxT], alpha_full[live_BxT], rtol=1e-5, atol=1e-6)
    assert not np.any(hidden[~live_BxT]) and not np.any(alpha[~live_BxT])
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_full))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                 jax.tree.leaves(grads_full)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('batch', [1, 8, 20, 64, 65, 100, 512, 4096])
def test_phases_are_few_and_cover_the_batch_in_steps_of_whole_tiles(batch):
    """Each phase compiles to loops of its own: their number must not grow with the batch."""
    rows = decoder_lib.phase_rows(batch)
    assert rows[0] == batch and rows[-1] > 0 and len(rows) <= 8
    spacing = {a - b for a, b in zip(rows, rows[1:])}
    assert len(spacing) <= 1 and all(s % 8 == 0 for s in spacing)
    assert rows[-1] <= (spacing.pop() if spacing else batch)  # the last phase is the smallest
    if batch <= 64:
        assert rows == tuple(range(batch, 0, -8))  # unchanged where 8 rows apart fit 8 phases


def test_the_train_steps_loops_do_not_grow_with_the_batch():
    """Compile time follows the loops: batch 256 in 32 phases took 68 s, 2.6x batch 64's."""
    def loops(batch):
        decoder, variables, features, tokens = _decoder_and_inputs(batch=batch, steps=5)
        steps_B = jnp.arange(batch) % 6

        def loss(variables):
            hidden, alpha = decoder.apply(variables, features, tokens, steps_B,
                                          method=Decoder.hidden_states)
            return jnp.sum(hidden) + jnp.sum(alpha)
        return jax.jit(jax.grad(loss)).lower(variables).as_text().count('stablehlo.while')

    assert loops(512) == loops(64) <= 2 * 8 + 1  # 8 phases, forward and backward, and one loop more


def test_lstm_cell_matches_a_hand_computation():
    cell = LSTMCell(units=3)
    h, c = jnp.full((2, 3), 0.1), jnp.full((2, 3), -0.2)
    x = jax.random.normal(jax.random.key(0), (2, 4))
    variables = captioner.init_variables(cell, 0, (h, c), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
    x64, h64 = np.asarray(x, np.float64), np.asarray(h, np.float64)
    z = x64 @ p['kernel'] + h64 @ p['recurrent_kernel'] + p['bias']
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    i, f, g, o = np.split(z, 4, axis=-1)   # Keras order
    want_c = sigmoid(f) * -0.2 + sigmoid(i) * np.tanh(g)
    got_h, got_c = cell.apply(variables, (h, c), x)
    np.testing.assert_allclose(got_c, want_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_h, sigmoid(o) * np.tanh(want_c), rtol=1e-5, atol=1e-6)


def test_logits_at_step_t_do_not_depend_on_later_tokens():
    decoder, variables, features, tokens = _decoder_and_inputs()
    apply = jax.jit(decoder.apply)
    logits = apply(variables, features, tokens)[0]
    for t in range(tokens.shape[1] - 1):
        changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % 11)
        changed_logits = apply(variables, features, changed)[0]
        np.testing.assert_array_equal(logits[:, :t + 1], changed_logits[:, :t + 1])
        assert not np.allclose(logits[:, t + 1], changed_logits[:, t + 1])


def test_gradient_of_step_t_is_zero_for_later_tokens():
    decoder, variables, features, tokens = _decoder_and_inputs()
    t = 3

    def logit_sum_at_t(embedding):
        v = jax.tree.map(lambda x: x, variables)
        v['params']['embedding']['embedding'] = embedding
        return decoder.apply(v, features, tokens)[0][:, t].sum()

    grad = jax.jit(jax.grad(logit_sum_at_t))(variables['params']['embedding']['embedding'])
    used = set(np.asarray(tokens[:, :t + 1]).ravel().tolist())
    later_only = set(np.asarray(tokens[:, t + 1:]).ravel().tolist()) - used
    for token in later_only:
        np.testing.assert_array_equal(grad[token], 0.0)
    assert any(np.abs(grad[token]).sum() > 0 for token in used)


def test_attention_matches_a_hand_computation():
    attention = BahdanauAttention(units=4)
    features = jax.random.normal(jax.random.key(1), (2, 5, 3))
    query = jax.random.normal(jax.random.key(2), (2, 6))
    variables = captioner.init_variables(attention, 3, features, query)
    context, alpha = attention.apply(variables, features, query)
    p = jax.tree.map(np.asarray, variables['params'])
    f, q = np.asarray(features, np.float64), np.asarray(query, np.float64)
    energy = np.tanh(f @ p['W1']['kernel'] + p['W1']['bias']
                     + (q @ p['W2']['kernel'] + p['W2']['bias'])[:, None])
    score = (energy @ p['V']['kernel'])[..., 0] + p['V']['bias'][0]
    expected_alpha = np.exp(score) / np.exp(score).sum(-1, keepdims=True)
    np.testing.assert_allclose(alpha, expected_alpha, rtol=1e-5)
    np.testing.assert_allclose(context, (expected_alpha[..., None] * f).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('units', [24, 96])   # 96: beam search's blocked sum over the units
def test_several_queries_per_image_attend_as_one_query_on_each_copy(units):
    """Beam search's K rows per image (rows b*K .. b*K + K - 1 on image b), against a numpy oracle."""
    images, regions, dim, beams = 3, 5, 4, 2
    rng = np.random.default_rng(0)
    keys, values, query, kernel = (rng.normal(size=shape).astype(np.float32) for shape in (
        (images, regions, units), (images, regions, dim), (images * beams, units), (units,)))
    context, alpha = attend_projected(keys, values, query, kernel, np.float32(0.3))
    image_of_row = np.repeat(np.arange(images), beams)
    k, v = np.float64(keys[image_of_row]), np.float64(values[image_of_row])
    score = (np.tanh(k + np.float64(query)[:, None]) @ kernel) + 0.3
    expected_alpha = np.exp(score) / np.exp(score).sum(-1, keepdims=True)
    np.testing.assert_allclose(alpha, expected_alpha, rtol=1e-5)
    np.testing.assert_allclose(context, (expected_alpha[..., None] * v).sum(1), rtol=1e-5, atol=1e-6)


def test_lstm_gates_follow_keras_order_and_forget_bias_is_one():
    decoder, variables, _, _ = _decoder_and_inputs()
    bias = np.asarray(variables['params']['lstm1']['bias'])
    units = bias.shape[0] // 4
    # Keras gate order i, f, c, o with unit_forget_bias: ones only in the f block.
    np.testing.assert_array_equal(bias[units:2 * units], 1.0)
    np.testing.assert_array_equal(np.delete(bias, np.s_[units:2 * units]), 0.0)


@pytest.mark.parametrize('stage_sizes', [(1, 1), ()])
def test_from_config_builds_the_configured_model(stage_sizes):
    from configs import tiny
    config = tiny.get_config()
    config.model.encoder.stage_sizes = stage_sizes
    model = captioner.from_config(config.model, vocab_size=17)
    assert model.vocab_size == 17 and tuple(model.stage_sizes) == stage_sizes
    assert model.units == config.model.units


def test_position_embedding_tells_identical_regions_apart():
    # Every grid cell holds the same feature vector: without a position
    # embedding all regions are identical and attention must be uniform.
    grid = jnp.ones((1, 3, 3, 5))
    tokens = jnp.zeros((1, 2), jnp.int32)
    for with_position, uniform in [(False, True), (True, False)]:
        model = captioner.Captioner(vocab_size=7, stage_sizes=(), embed_dim=4, units=8,
                                    attention_units=4, position_embedding=with_position)
        variables = captioner.init_variables(model, 0, grid, tokens)
        regions = model.apply(variables, grid, method=captioner.Captioner.encode)
        assert regions.shape == (1, 9, 4)
        _, alpha = model.apply(variables, grid, tokens)
        assert np.allclose(alpha, 1 / 9, atol=1e-7) == uniform
    assert variables['params']['position']['embedding'].shape == (9, 4)


@pytest.mark.parametrize('kernel_size, strides, padding, size', [
    ((7, 7), 2, 'VALID', 23),   # the stem (after its explicit zero padding)
    ((3, 3), 1, 'SAME', 9),     # a bottleneck's middle conv
    ((1, 1), 2, 'VALID', 10),   # a stage's first 1x1, strided
    ((1, 1), 1, 'VALID', 5)])
def test_matmul_conv_equals_flax_conv_with_the_same_parameters(kernel_size, strides, padding, size):
    import flax.linen as nn
    x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
    ours = resnet.Conv(6, kernel_size, strides, padding)
    flax_conv = nn.Conv(6, kernel_size, strides, padding=padding)
    variables = ours.init(jax.random.key(1), x)
    # Same parameter names, shapes and initial values as nn.Conv.
    jax.tree.map(np.testing.assert_array_equal, variables, flax_conv.init(jax.random.key(1), x))
    variables = jax.tree.map(lambda p: p + 0.1, variables)  # a nonzero bias, too

    def loss(v, module):
        return jnp.sum(jnp.sin(module.apply(v, x)))
    np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
                 jax.grad(loss)(variables, ours), jax.grad(loss)(variables, flax_conv))
