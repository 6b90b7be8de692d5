"""物品目录：双向查找、文件格式、校验。"""
import numpy as np
import pytest

from algorithm.models.catalog import Catalog, CatalogError, load_catalog, synthetic_catalog


def test_roundtrip_lookup_and_file(tmp_path):
    cat = synthetic_catalog(1000, (1024, 4096, 16384), seed=5)
    sem, found = cat.lookup_items(cat.item_ids[::7])
    assert found.all()
    items, found2 = cat.lookup_codes(sem)
    assert found2.all() and np.array_equal(items, cat.item_ids[::7])
    _, f = cat.lookup_items(np.array([-1, 0, 10 ** 12]))
    assert not f.any()
    items, f = cat.lookup_codes(np.array([[2000, 0, 0], [-1, 5, 5]]))
    assert not f.any() and (items == -1).all()
    path = cat.save(str(tmp_path / "c.npz"))
    again = load_catalog(path)
    assert np.array_equal(again.item_ids, cat.item_ids) and again.codebook_sizes == cat.codebook_sizes


def test_synthetic_catalog_is_seeded():
    a = synthetic_catalog(300, (1024, 4096, 16384), seed=1)
    b = synthetic_catalog(300, (1024, 4096, 16384), seed=1)
    assert np.array_equal(a.semantic_ids, b.semantic_ids) and np.array_equal(a.item_ids, b.item_ids)


@pytest.mark.parametrize("ids, sem, words", [
    ([1, 1], [[0, 0, 0], [0, 0, 1]], "item_ids 有重复"),
    ([1, 2], [[0, 0, 0], [0, 0, 0]], "三元组重复"),
    ([1, 2], [[0, 0, 0], [0, 4096, 1]], "l2 = 4096"),
    ([-3, 2], [[0, 0, 0], [0, 1, 1]], "非负"),
])
def test_invalid_catalogs_are_refused(ids, sem, words):
    with pytest.raises(CatalogError, match=words):
        Catalog(np.array(ids), np.array(sem), (1024, 4096, 16384))


def test_bad_file(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, item_ids=np.arange(3))
    with pytest.raises(CatalogError, match="缺少字段"):
        load_catalog(str(p))
    with pytest.raises(CatalogError, match="不存在"):
        load_catalog(str(tmp_path / "none.npz"))
