"""Draw one synthetic pedestrian crop with Pillow: figure from attributes, everything else random per image.

The identity fixes only the attributes (garment colours and types, bag, hat, shoes, hair, gender's
build). Pose, view, scale, position, skin, background, clutter, occluders, lighting and colour jitter
change from image to image, so matching needs the attributes and nothing else.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets.synthetic.attributes import ATTRIBUTES, COLOURS, HAIR_COLOURS, OPTIONAL_COLOURS

SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing
SKIN = [(236, 200, 170), (214, 170, 130), (176, 126, 90), (120, 82, 56)]


def _jitter(rgb, rng: random.Random, amount: float = 14.0) -> tuple[int, int, int]:
    """A garment colour as one image sees it: per-channel noise and a shade factor."""
    shade = rng.uniform(0.85, 1.1)
    return tuple(int(max(0, min(255, c * shade + rng.gauss(0, amount)))) for c in rgb)


def _darker(rgb, factor: float = 0.7) -> tuple[int, int, int]:
    """Shadowed version of a colour (seams, zips, folds)."""
    return tuple(int(c * factor) for c in rgb)


def _background(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> None:
    """Wall/street background with a horizon, buildings, windows and poles; some clutter in garment colours."""
    wall = tuple(rng.randint(40, 200) for _ in range(3))
    ground = tuple(rng.randint(50, 170) for _ in range(3))
    horizon = int(h * rng.uniform(0.5, 0.8))
    for y in range(0, horizon, 4):  # vertical gradient in bands
        f = 1.0 - 0.25 * y / horizon
        draw.rectangle([0, y, w, y + 4], fill=tuple(int(c * f) for c in wall))
    draw.rectangle([0, horizon, w, h], fill=ground)
    for _ in range(rng.randint(2, 7)):
        colour = _jitter(rng.choice(list(COLOURS.values())), rng, 25) if rng.random() < 0.35 else \
            tuple(rng.randint(20, 230) for _ in range(3))
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(0, 0.9) * horizon
        bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.05, 0.5) * h
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=colour)
    for _ in range(rng.randint(0, 2)):
        x = rng.uniform(0, w)
        draw.rectangle([x, 0, x + rng.uniform(0.02, 0.06) * w, horizon + rng.uniform(0, 0.2) * h],
                       fill=tuple(rng.randint(30, 160) for _ in range(3)))


def random_attributes(rng: random.Random) -> dict:
    """Attributes of a passer-by (not an identity of the dataset): for background people."""
    attrs = {name: rng.choice(values) for name, values in ATTRIBUTES.items()}
    for colour_name, (item, palette) in OPTIONAL_COLOURS.items():
        if attrs[item] != "none":
            attrs[colour_name] = rng.choice(palette)
    return attrs


def draw_figure(draw: ImageDraw.ImageDraw, attrs: dict, rng: random.Random, cx: float, foot: float,
                height: float) -> None:
    """Draw a person standing on (cx, foot), `height` pixels tall, in a random view and walking phase."""
    u = height
    top = foot - u
    woman = attrs["gender"] == "woman"
    view = rng.choices(["front", "back", "side"], weights=[0.4, 0.35, 0.25])[0]
    facing = rng.choice([-1, 1])  # side view: which way the figure faces
    swing = rng.uniform(-1, 1) * {"front": 0.035, "back": 0.035, "side": 0.12}[view] * u
    skin = _jitter(rng.choice(SKIN), rng, 8)
    upper = _jitter(COLOURS[attrs["upper_colour"]], rng)
    lower = _jitter(COLOURS[attrs["lower_colour"]], rng)
    shoes = _jitter(COLOURS[attrs["shoes"]], rng)
    hair = _jitter(HAIR_COLOURS[attrs["hair"]], rng, 10)

    narrow = 0.6 if view == "side" else 1.0
    shoulder = (0.105 if woman else 0.128) * u * narrow
    hip = (0.092 if woman else 0.088) * u * narrow
    head_r = 0.062 * u
    head_y = top + head_r * 1.05
    shoulder_y, waist_y, knee_y, ankle_y = top + 0.165 * u, top + 0.47 * u, top + 0.71 * u, foot - 0.045 * u
    hem_y = top + (0.68 if attrs["upper_type"] == "coat" else 0.5) * u
    leg_w = 0.072 * u
    legs = [(cx - hip * 0.5, cx - hip * 0.5 + swing), (cx + hip * 0.5, cx + hip * 0.5 - swing)]

    def bag_box(y0: float, y1: float, x0: float, x1: float) -> None:
        """A bag's body in the identity's bag colour (shade jittered per image)."""
        colour = _jitter(COLOURS[attrs["bag_colour"]], rng)
        draw.rounded_rectangle([min(x0, x1), y0, max(x0, x1), y1], radius=0.015 * u, fill=colour,
                               outline=_darker(colour))

    if attrs["gender"] == "woman" and view != "back":  # long hair falls behind the shoulders
        draw.rectangle([cx - head_r * 1.05, head_y, cx + head_r * 1.05, shoulder_y + 0.07 * u], fill=hair)
    if attrs["bag"] == "backpack" and view in ("front", "side"):
        side = -facing if view == "side" else 1
        x_edge = cx + side * shoulder * (1.35 if view == "side" else 1.05)
        bag_box(shoulder_y + 0.02 * u, waist_y - 0.02 * u, cx, x_edge)

    # legs: skin under skirts/shorts, garment colour for trousers; one polygon per leg from hip to ankle
    for hip_x, ankle_x in legs:
        cover = {"trousers": ankle_y, "shorts": knee_y - 0.04 * u, "skirt": waist_y}[attrs["lower_type"]]
        draw.polygon([(hip_x - leg_w / 2, waist_y), (hip_x + leg_w / 2, waist_y),
                      (ankle_x + leg_w * 0.4, ankle_y), (ankle_x - leg_w * 0.4, ankle_y)], fill=skin)
        if cover > waist_y:
            t = (cover - waist_y) / (ankle_y - waist_y)
            x_c = hip_x + (ankle_x - hip_x) * t
            wid = leg_w / 2 * (1 - 0.2 * t) + 0.004 * u
            draw.polygon([(hip_x - leg_w / 2 - 0.004 * u, waist_y), (hip_x + leg_w / 2 + 0.004 * u, waist_y),
                          (x_c + wid, cover), (x_c - wid, cover)], fill=lower)
        toe = facing * 0.04 * u if view == "side" else 0
        draw.ellipse([ankle_x - 0.04 * u + min(toe, 0), ankle_y - 0.01 * u,
                      ankle_x + 0.04 * u + max(toe, 0), foot], fill=shoes)
    if attrs["lower_type"] == "skirt":
        flare = hip * 1.55
        draw.polygon([(cx - hip * 1.05, waist_y - 0.01 * u), (cx + hip * 1.05, waist_y - 0.01 * u),
                      (cx + flare, knee_y + 0.01 * u), (cx - flare, knee_y + 0.01 * u)], fill=lower)
    else:  # a waistband joins the two legs
        draw.rectangle([cx - hip * 1.05, waist_y - 0.01 * u, cx + hip * 1.05, waist_y + 0.05 * u], fill=lower)

    # torso and arms, with type-specific details (zip, rib, collar, sleeves)
    hem = hip * (1.35 if attrs["upper_type"] == "coat" else 1.08)
    draw.polygon([(cx - shoulder, shoulder_y), (cx + shoulder, shoulder_y), (cx + hem, hem_y), (cx - hem, hem_y)],
                 fill=upper)
    if view == "front" and attrs["upper_type"] in ("jacket", "coat"):
        draw.line([(cx, shoulder_y), (cx, hem_y)], fill=_darker(upper, 0.55), width=max(1, int(0.012 * u)))
    if attrs["upper_type"] == "sweater":
        draw.rectangle([cx - hem, hem_y - 0.03 * u, cx + hem, hem_y], fill=_darker(upper, 0.8))
    if attrs["upper_type"] == "t-shirt" and view == "front":
        draw.pieslice([cx - 0.04 * u, shoulder_y - 0.03 * u, cx + 0.04 * u, shoulder_y + 0.035 * u], 0, 180, fill=skin)
    arm_w = 0.05 * u
    hand_y = top + 0.5 * u
    for side in (-1, 1):
        if view == "side" and side == facing:
            continue  # the far arm is hidden behind the torso
        sx = cx + side * (shoulder - arm_w * 0.35)
        hx = sx + side * 0.025 * u - (swing * 0.8 if side < 0 else -swing * 0.8)
        sleeve = 0.35 if attrs["upper_type"] == "t-shirt" else 1.0
        ex, ey = sx + (hx - sx) * sleeve, shoulder_y + (hand_y - shoulder_y) * sleeve
        draw.line([(sx, shoulder_y + arm_w / 2), (hx, hand_y)], fill=skin, width=int(arm_w * 0.85))
        draw.line([(sx, shoulder_y + arm_w / 2), (ex, ey)], fill=upper, width=int(arm_w))
        draw.ellipse([hx - arm_w * 0.5, hand_y - arm_w * 0.5, hx + arm_w * 0.5, hand_y + arm_w * 0.5], fill=skin)
        if attrs["bag"] == "handbag" and side == (facing if view != "side" else -facing):
            bag_box(hand_y, hand_y + 0.1 * u, hx - 0.05 * u, hx + 0.05 * u)

    if attrs["bag"] == "shoulder bag":
        side = rng.choice([-1, 1])
        colour = _jitter(COLOURS[attrs["bag_colour"]], rng)
        if view != "side":
            draw.line([(cx - side * shoulder * 0.8, shoulder_y), (cx + side * hip, waist_y)], fill=colour,
                      width=max(1, int(0.018 * u)))
        bag_box(waist_y - 0.06 * u, waist_y + 0.05 * u, cx + side * hip * 0.6, cx + side * (hip + 0.07 * u))
    if attrs["bag"] == "backpack":
        colour = _jitter(COLOURS[attrs["bag_colour"]], rng)
        if view == "back":
            bag_box(shoulder_y + 0.02 * u, waist_y - 0.04 * u, cx - shoulder * 0.75, cx + shoulder * 0.75)
        elif view == "front":
            for side in (-1, 1):
                x = cx + side * shoulder * 0.55
                draw.line([(x, shoulder_y), (x, waist_y - 0.1 * u)], fill=colour, width=max(1, int(0.02 * u)))

    # head, hair, hat
    draw.rectangle([cx - 0.022 * u, head_y, cx + 0.022 * u, shoulder_y + 0.01 * u], fill=skin)
    draw.ellipse([cx - head_r * 0.88, head_y - head_r, cx + head_r * 0.88, head_y + head_r], fill=skin)
    if view == "back":
        draw.ellipse([cx - head_r * 0.92, head_y - head_r * 1.05, cx + head_r * 0.92, head_y + head_r * 0.9], fill=hair)
        if woman:
            draw.rectangle([cx - head_r * 0.95, head_y, cx + head_r * 0.95, shoulder_y + 0.07 * u], fill=hair)
    else:
        draw.chord([cx - head_r * 0.95, head_y - head_r * 1.08, cx + head_r * 0.95, head_y + head_r * 0.7],
                   180, 360, fill=hair)
        if view == "side":
            back = -facing
            draw.pieslice([cx - head_r * 0.95, head_y - head_r * 1.05, cx + head_r * 0.95, head_y + head_r * 0.9],
                          90 if back < 0 else 270, 270 if back < 0 else 450, fill=hair)
    if attrs["hat"] != "none":
        colour = _jitter(COLOURS[attrs["hat_colour"]], rng)
        if attrs["hat"] == "cap":
            draw.chord([cx - head_r, head_y - head_r * 1.15, cx + head_r, head_y + head_r * 0.45], 180, 360,
                       fill=colour)
            brim = facing if view == "side" else rng.choice([-1, 1]) * 0.4
            draw.rectangle([min(cx, cx + brim * head_r * 1.6), head_y - head_r * 0.4,
                            max(cx, cx + brim * head_r * 1.6), head_y - head_r * 0.25], fill=colour)
        else:
            draw.rounded_rectangle([cx - head_r, head_y - head_r * 1.15, cx + head_r, head_y - head_r * 0.15],
                                   radius=head_r * 0.5, fill=colour)


def render(attrs: dict, rng: random.Random, size: tuple[int, int] = (64, 128)) -> Image.Image:
    """One RGB crop (size = width, height) of the identity with `attrs`, everything else drawn from `rng`."""
    w, h = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    _background(draw, w, h, rng)
    cx = w * (0.5 + rng.uniform(-0.1, 0.1))
    foot = h * rng.uniform(0.955, 0.995)
    height = h * rng.uniform(0.76, 0.94)
    if rng.random() < 0.35:  # a passer-by at the edge of the crop, behind or in front of the person
        side = rng.choice([-1, 1])
        other = dict(cx=cx + side * w * rng.uniform(0.55, 0.85), foot=foot + h * rng.uniform(-0.05, 0.03),
                     height=height * rng.uniform(0.85, 1.05))
        in_front = rng.random() < 0.3
        if not in_front:
            draw_figure(draw, random_attributes(rng), rng, **other)
    else:
        in_front = False
    draw_figure(draw, attrs, rng, cx, foot, height)
    if in_front:
        draw_figure(draw, random_attributes(rng), rng, **other)
    if rng.random() < 0.2:  # an occluder in front of the legs (bollard, bench, car bonnet)
        y0 = h * rng.uniform(0.72, 0.9)
        x0 = rng.uniform(-0.3, 0.6) * w
        draw.rectangle([x0, y0, x0 + rng.uniform(0.25, 0.7) * w, h], fill=tuple(rng.randint(20, 220) for _ in range(3)))

    img = img.resize(size, Image.BILINEAR if rng.random() < 0.5 else Image.BOX)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    # lighting: global brightness and contrast, colour cast, a left-right light gradient, sensor noise
    pixels = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.65, 1.3) * np.array([rng.uniform(0.9, 1.1) for _ in range(3)], dtype=np.float32)
    ramp = np.linspace(1 - rng.uniform(0, 0.2), 1 + rng.uniform(0, 0.2), size[0], dtype=np.float32)
    if rng.random() < 0.5:
        ramp = ramp[::-1]
    contrast = rng.uniform(0.8, 1.15)
    pixels = (pixels - 128) * contrast + 128
    pixels = pixels * gain * ramp[None, :, None]
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, rng.uniform(1, 6), pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
