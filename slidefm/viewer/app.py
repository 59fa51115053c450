"""The viewer's web app (FastAPI). Routes:

- ``/`` cohort page, ``/slide/{slide_id}`` slide page, ``/static/…`` bundled JS/CSS
  (OpenSeadragon included: nothing is fetched from a CDN);
- ``/api/cohort`` rows of the cohort table, ``/api/slides/{id}`` side-panel data and overlay
  list, ``/api/slides/{id}/thumbnail.jpg``, ``/api/slides/{id}/overlays/{layer}.json`` (tile
  boxes in level-0 px and values) and ``.geojson`` (QuPath export, ``slidefm heatmap``'s writer);
- ``/dz/{id}/{layer}.dzi`` and ``/dz/{id}/{layer}_files/{level}/{col}_{row}.{jpeg|png}``: Deep
  Zoom of the slide (``layer = slide``) or of an overlay (``tissue``, ``tiles``, ``mil``, ``zsK``).

Safety: slides are looked up by ``slide_id`` in the cohort only; no request names a file.
Malformed addresses are 400, unknown slides/layers/levels/tiles 404. Endpoints are plain
``def`` so FastAPI runs them in its thread pool: tile requests are served concurrently.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from slidefm.viewer.analysis import Models, ScoreCache
from slidefm.viewer.cohort import Cohort, SlideEntry, SlideUnavailable
from slidefm.viewer.deepzoom import (
    TILE_TYPES,
    DZGeometry,
    LRUBytes,
    TileAddressError,
    colour_stops,
    encode_image,
    grid_tile,
    heat_tile,
    mask_outline_tile,
)

STATIC = Path(__file__).parent / "static"
TILE_RE = re.compile(r"^(\d{1,6})_(\d{1,6})\.([a-z]{3,4})$")
LAYER_RE = re.compile(r"^[a-z0-9]{1,16}$")


class Viewer:
    """State shared by all requests: the cohort, the models, the score and tile caches."""

    def __init__(self, cohort: Cohort, models: Models, cache_mb: int = 256):
        self.cohort, self.models = cohort, models
        self.scores = ScoreCache(cohort, models)
        self.tiles = LRUBytes(cache_mb << 20)
        self._tissue: dict[str, tuple[np.ndarray, float]] = {}

    # -- lookups that turn bad requests into 404 ---------------------------------------------
    def entry(self, slide_id: str) -> SlideEntry:
        e = self.cohort.get(slide_id)
        if e is None:
            raise HTTPException(404, f"no slide {slide_id!r} in this cohort")
        return e

    def view(self, slide_id: str):
        try:
            return self.entry(slide_id).open()
        except SlideUnavailable as e:
            raise HTTPException(404, str(e)) from None

    def geometry(self, slide_id: str) -> DZGeometry:
        r = self.view(slide_id).reader
        return DZGeometry(r.info.width, r.info.height)

    def layers(self, slide_id: str) -> dict[str, dict[str, Any]]:
        """Overlay name → description, for the slide's side panel and legend."""
        sc = self.scores.get(slide_id)
        out: dict[str, dict[str, Any]] = {
            "tissue": {"label": "tissue mask outline", "kind": "outline", "colour": "#00c800"}
        }
        if sc.features is not None:
            out["tiles"] = {
                "label": f"kept tiles ({sc.features.num_tiles})",
                "kind": "outline",
                "colour": "#1e3cdc",
            }
        for ly in sc.layers.values():
            out[ly.name] = {
                "label": ly.label,
                "kind": "heatmap",
                "legend": {"low": ly.legend[0], "high": ly.legend[1]},
                "colours": colour_stops(ly.cmap),
                "exportable": True,
            }
        if "tiles" in out:
            out["tiles"]["exportable"] = True
        return out

    def tissue(self, slide_id: str) -> tuple[np.ndarray, float]:
        """(mask, level-0 px per mask px), computed once per slide as encode-slides does."""
        if slide_id not in self._tissue:
            from slidefm.encoders.encode_config import EncodeConfig
            from slidefm.wsi.tissue import slide_tissue_mask

            reader = self.view(slide_id).reader
            try:
                _, mask, scale = slide_tissue_mask(reader, EncodeConfig().tissue_config())
            except Exception as e:  # e.g. no µm/px: no outline, a clear message
                raise HTTPException(404, f"tissue mask unavailable: {e}") from None
            self._tissue[slide_id] = (mask, scale)
        return self._tissue[slide_id]

    def layer_values(self, slide_id: str, layer: str) -> tuple[Any, np.ndarray, np.ndarray, str]:
        """(SlideScores, raw scores, display values, name) of a per-tile layer."""
        sc = self.scores.get(slide_id)
        if sc.features is None:
            raise HTTPException(404, f"{slide_id}: no feature file")
        if layer == "tiles":
            tf = sc.features.tissue_fraction.astype(np.float64)
            return sc, tf, tf, "tissue fraction"
        if layer not in sc.layers:
            raise HTTPException(404, f"{slide_id}: no overlay {layer!r}")
        ly = sc.layers[layer]
        return sc, ly.scores, ly.values01, ly.label

    def render(self, slide_id: str, layer: str, level: int, col: int, row: int, fmt: str) -> bytes:
        view = self.view(slide_id)
        geom = DZGeometry(view.reader.info.width, view.reader.info.height)
        try:
            geom.tile_box(level, col, row)  # validates the address
            if layer == "slide":
                try:
                    img = view.dz.get_tile(level, (col, row))
                except Exception as e:  # unreadable region of a corrupt slide: tile missing
                    msg = f"{slide_id}: tile unreadable ({type(e).__name__}: {e})"
                    raise HTTPException(404, msg) from None
            elif layer == "tissue":
                mask, scale = self.tissue(slide_id)
                img = mask_outline_tile(geom, level, col, row, mask, scale)
            elif layer == "tiles":
                sc = self.scores.get(slide_id)
                if sc.features is None:
                    raise HTTPException(404, f"{slide_id}: no feature file")
                img = grid_tile(geom, level, col, row, sc.features.coords, sc.patch_size_level0)
            else:
                sc, _, vals, _ = self.layer_values(slide_id, layer)
                ly = sc.layers[layer]
                img = heat_tile(
                    geom, level, col, row, sc.features.coords, sc.patch_size_level0, vals, ly.cmap
                )
        except TileAddressError as e:
            raise HTTPException(404, str(e)) from None
        return encode_image(img, fmt)


def _slide_properties(entry: SlideEntry) -> dict[str, Any]:
    info = entry.open().reader.info
    return {
        "vendor": info.vendor,
        "backend": info.backend,
        "width": info.width,
        "height": info.height,
        "level_count": info.level_count,
        "level_dimensions": [list(d) for d in info.level_dimensions],
        "level_downsamples": list(info.level_downsamples),
        "mpp": list(info.mpp) if info.mpp else None,
        "mpp_source": info.mpp_source,
        "objective_power": info.objective_power,
    }


def create_app(viewer: Viewer) -> FastAPI:
    app = FastAPI(title="slidefm viewer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.viewer = viewer
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    v = viewer

    @app.get("/")
    def index():
        if len(v.cohort.entries) == 1 and v.cohort.manifest is None:
            return RedirectResponse(f"/slide/{next(iter(v.cohort.entries))}")
        return FileResponse(STATIC / "cohort.html")

    @app.get("/slide/{slide_id}")
    def slide_page(slide_id: str):
        v.entry(slide_id)
        return FileResponse(STATIC / "slide.html")

    @app.get("/api/cohort")
    def cohort():
        rows = []
        for sid, e in v.cohort.entries.items():
            err = e.open_error
            sc = v.scores.get(sid)
            rows.append(
                {
                    "slide_id": sid,
                    "case_id": e.case_id,
                    "labels": e.labels,
                    "open_error": err,
                    "encode_error": e.encode_error,
                    "num_tiles": sc.features.num_tiles if sc.features else None,
                    "mil": None
                    if sc.mil is None
                    else {k: sc.mil[k] for k in ("prediction", "probability", "random_weights")},
                    "zero_shot": None
                    if not sc.zero_shot or "prediction" not in sc.zero_shot
                    else {
                        "prediction": sc.zero_shot["prediction"],
                        "probability": sc.zero_shot["probabilities"][sc.zero_shot["prediction"]],
                    },
                    "errors": sc.errors,
                }
            )
        return JSONResponse(_jsonable({"slides": rows, "labels": _label_columns(v.cohort)}))

    @app.get("/api/slides/{slide_id}")
    def slide_info(slide_id: str):
        e = v.entry(slide_id)
        err = e.open_error
        out: dict[str, Any] = {
            "slide_id": slide_id,
            "case_id": e.case_id,
            "labels": e.labels,
            "open_error": err,
            "encode_error": e.encode_error,
        }
        if err is None:
            g = v.geometry(slide_id)
            sc = v.scores.get(slide_id)
            out.update(
                properties=_slide_properties(e),
                dzi=f"/dz/{slide_id}/slide.dzi",
                size=[g.width, g.height],
                overlays=v.layers(slide_id),
                mil=sc.mil,
                zero_shot=sc.zero_shot,
                retrieval=sc.retrieval,
                errors=sc.errors,
                features=None
                if sc.features is None
                else {
                    "num_tiles": sc.features.num_tiles,
                    "patch_size_level0": sc.patch_size_level0,
                    "encoder": sc.features.attrs.get("encoder"),
                    "encoder_weights": sc.features.attrs.get("encoder_weights"),
                    "target_mpp": sc.features.attrs.get("target_mpp"),
                },
            )
        return JSONResponse(_jsonable(out))

    @app.get("/api/slides/{slide_id}/thumbnail.jpg")
    def thumbnail(slide_id: str, size: int = 192):
        if not 16 <= size <= 1024:
            raise HTTPException(400, "size must be in 16..1024")
        view = v.view(slide_id)

        def make() -> bytes:
            from PIL import Image

            thumb, _ = view.reader.thumbnail(size)
            return encode_image(Image.fromarray(thumb), "jpeg")

        try:
            data = v.tiles.get_or_make((slide_id, "thumb", size), make)
        except Exception as e:
            raise HTTPException(404, f"{slide_id}: thumbnail unreadable ({e})") from None
        return Response(data, media_type="image/jpeg")

    @app.get("/api/slides/{slide_id}/overlays/{name}")
    def overlay_data(slide_id: str, name: str):
        layer, _, ext = name.partition(".")
        if ext not in ("json", "geojson") or not LAYER_RE.match(layer):
            raise HTTPException(400, "expected <layer>.json or <layer>.geojson")
        sc, scores, vals, label = v.layer_values(slide_id, layer)
        s = sc.patch_size_level0
        if ext == "geojson":
            from slidefm.eval.heatmap import tiles_geojson

            cmap = sc.layers[layer].cmap if layer in sc.layers else "jet"
            fc = tiles_geojson(
                sc.features.coords,
                s,
                scores,
                vals,
                name=label,
                cmap=cmap,
                extra={"slide_id": slide_id, "overlay": layer},
            )
            return JSONResponse(
                fc,
                media_type="application/geo+json",
                headers={
                    "Content-Disposition": f'attachment; filename="{slide_id}_{layer}.geojson"'
                },
            )
        c = sc.features.coords
        boxes = np.stack([c[:, 0], c[:, 1], c[:, 0] + s, c[:, 1] + s], 1)
        return JSONResponse(
            _jsonable(
                {
                    "layer": layer,
                    "label": label,
                    "patch_size_level0": s,
                    "boxes": boxes.tolist(),
                    "scores": scores.tolist(),
                    "values": vals.tolist(),
                }
            )
        )

    @app.get("/dz/{slide_id}/{name}")
    def dzi(slide_id: str, name: str):
        layer, _, ext = name.partition(".")
        if ext != "dzi" or not LAYER_RE.match(layer):
            raise HTTPException(400, "expected <layer>.dzi")
        g = v.geometry(slide_id)
        if layer != "slide" and layer not in v.layers(slide_id):
            raise HTTPException(404, f"{slide_id}: no overlay {layer!r}")
        return Response(g.dzi("jpeg" if layer == "slide" else "png"), media_type="application/xml")

    @app.get("/dz/{slide_id}/{files}/{level}/{tile}")
    def tile(slide_id: str, files: str, level: str, tile: str):
        m = TILE_RE.match(tile)
        if not files.endswith("_files") or not level.isdigit() or len(level) > 3 or m is None:
            raise HTTPException(
                400, "expected /dz/<slide_id>/<layer>_files/<level>/<col>_<row>.<fmt>"
            )
        layer = files[: -len("_files")]
        fmt = m.group(3)
        if not LAYER_RE.match(layer) or fmt not in TILE_TYPES:
            raise HTTPException(400, f"bad layer or tile format {fmt!r} (jpeg, png)")
        v.entry(slide_id)
        if layer not in ("slide", "tissue", "tiles") and layer not in v.layers(slide_id):
            raise HTTPException(404, f"{slide_id}: no overlay {layer!r}")
        lv, col, row = int(level), int(m.group(1)), int(m.group(2))
        key = (slide_id, layer, lv, col, row, fmt)
        data = v.tiles.get_or_make(key, lambda: v.render(slide_id, layer, lv, col, row, fmt))
        media = "image/jpeg" if TILE_TYPES[fmt] == "JPEG" else "image/png"
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    return app


def _label_columns(cohort: Cohort) -> list[str]:
    cols: dict[str, None] = {}
    for e in cohort.entries.values():
        cols.update(dict.fromkeys(e.labels))
    return list(cols)


def _jsonable(x: Any) -> Any:
    """Numpy scalars/arrays and NaN → plain JSON values."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
