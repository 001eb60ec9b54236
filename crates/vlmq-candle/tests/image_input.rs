//! The CLIP image rule on synthetic images: shortest-side resize, center
//! crop, normalization, layout; PNG / JPEG decoding. (The fixture's 32x32
//! images, where resize and crop are the identity, are checked against
//! transformers' pixel_values in `hf_llava.rs`.)

use image::{ImageFormat, Rgb, RgbImage};
use vlmq_candle::candle_core::Device;
use vlmq_candle::process::image_input::{load_image, ClipImageProcessor, CLIP_MEAN, CLIP_STD};

fn proc(edge: usize, crop: usize) -> ClipImageProcessor {
    ClipImageProcessor {
        shortest_edge: edge,
        crop,
        ..ClipImageProcessor::for_image_size(crop)
    }
}

#[test]
fn crop_without_resize_takes_the_center_rows() {
    // 24 wide, 40 high: the shortest side already is 24, so no resize; the
    // crop keeps rows 8..32 (top = (40 - 24) / 2).
    let img = RgbImage::from_fn(24, 40, |x, y| Rgb([y as u8, x as u8, 7]));
    let out = proc(24, 24).resize_and_crop(&img);
    assert_eq!(out.dimensions(), (24, 24));
    for (x, y, p) in out.enumerate_pixels() {
        assert_eq!(p.0, [(y + 8) as u8, x as u8, 7]);
    }
}

#[test]
fn resize_keeps_the_aspect_ratio_and_crops_the_long_side() {
    // 40 x 24 -> shortest side 16: 26 x 16 (floor(16 * 40 / 24)), crop 16
    // from column 5. A uniform image stays uniform through the bicubic
    // filter (its weights sum to 1), so every value is exactly CLIP's
    // normalization of the color.
    let img = RgbImage::from_pixel(40, 24, Rgb([200, 100, 0]));
    let p = proc(16, 16);
    assert_eq!(p.resize_and_crop(&img).dimensions(), (16, 16));
    let v = p.preprocess(&img);
    assert_eq!(v.len(), 3 * 16 * 16);
    for (c, val) in [200.0f32, 100.0, 0.0].iter().enumerate() {
        let want = (val / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        assert!(v[c * 256..(c + 1) * 256].iter().all(|&x| x == want));
    }
    // A horizontal ramp stays increasing after downscaling, and the crop is
    // the middle: its first column is darker than its last.
    let ramp = RgbImage::from_fn(80, 48, |x, _| Rgb([(x * 3) as u8, 0, 0]));
    let out = p.resize_and_crop(&ramp);
    let row: Vec<u8> = (0..16).map(|x| out.get_pixel(x, 8).0[0]).collect();
    assert!(row.windows(2).all(|w| w[0] <= w[1]), "{row:?}");
    assert!(row[0] > 10 && row[15] < 230, "{row:?}");
}

#[test]
fn small_images_are_padded_around_the_center() {
    // Shortest edge 8 but crop 12: the 8 x 8 image sits at offset 2.
    let img = RgbImage::from_pixel(8, 8, Rgb([255, 255, 255]));
    let out = proc(8, 12).resize_and_crop(&img);
    assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(out.get_pixel(2, 2).0, [255, 255, 255]);
    assert_eq!(out.get_pixel(9, 9).0, [255, 255, 255]);
    assert_eq!(out.get_pixel(10, 10).0, [0, 0, 0]);
}

#[test]
fn batches_are_nchw() {
    let a = RgbImage::from_pixel(4, 4, Rgb([0, 0, 0]));
    let b = RgbImage::from_pixel(4, 4, Rgb([255, 255, 255]));
    let t = proc(4, 4).batch(&[a, b], &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 3, 4, 4]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v[0], -CLIP_MEAN[0] / CLIP_STD[0]);
    assert_eq!(v[48 + 16], (1.0 - CLIP_MEAN[1]) / CLIP_STD[1]);
    assert!(proc(4, 4).batch(&[], &Device::Cpu).is_err());
}

#[test]
fn png_and_jpeg_decode() {
    let tmp = std::env::temp_dir().join(format!("vlmq-img-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let img = RgbImage::from_fn(16, 12, |x, y| Rgb([(x * 10) as u8, (y * 20) as u8, 99]));
    let png = tmp.join("a.png");
    img.save_with_format(&png, ImageFormat::Png).unwrap();
    assert_eq!(load_image(&png).unwrap(), img);
    // JPEG is lossy: a flat color comes back within a few levels.
    let flat = RgbImage::from_pixel(16, 16, Rgb([120, 60, 200]));
    let jpg = tmp.join("b.jpg");
    flat.save_with_format(&jpg, ImageFormat::Jpeg).unwrap();
    let back = load_image(&jpg).unwrap();
    assert_eq!(back.dimensions(), (16, 16));
    for p in back.pixels() {
        for c in 0..3 {
            assert!((p.0[c] as i32 - flat.get_pixel(0, 0).0[c] as i32).abs() <= 4);
        }
    }
    // Not an image: a typed I/O error.
    let bad = tmp.join("c.png");
    std::fs::write(&bad, b"not an image").unwrap();
    assert!(matches!(
        load_image(&bad).unwrap_err(),
        vlmq::Error::Io { .. }
    ));
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn preprocessor_config_is_read() {
    let tmp = std::env::temp_dir().join(format!("vlmq-pre-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let p = tmp.join("preprocessor_config.json");
    std::fs::write(
        &p,
        r#"{"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]}"#,
    )
    .unwrap();
    let c = ClipImageProcessor::from_preprocessor_config(&p, 16).unwrap();
    assert_eq!((c.shortest_edge, c.crop), (40, 32));
    assert_eq!((c.mean, c.std), ([0.5; 3], [0.25, 0.5, 1.0]));
    // Missing fields fall back to CLIP's values at the tower's size.
    std::fs::write(&p, "{}").unwrap();
    assert_eq!(
        ClipImageProcessor::from_preprocessor_config(&p, 16).unwrap(),
        ClipImageProcessor::for_image_size(16)
    );
    // A zero std or a two-value mean is a typed error.
    std::fs::write(&p, r#"{"image_std": [0.0, 1.0, 1.0]}"#).unwrap();
    assert!(matches!(
        ClipImageProcessor::from_preprocessor_config(&p, 16).unwrap_err(),
        vlmq::Error::Json { .. }
    ));
    std::fs::write(&p, r#"{"image_mean": [0.5, 0.5]}"#).unwrap();
    assert!(matches!(
        ClipImageProcessor::from_preprocessor_config(&p, 16).unwrap_err(),
        vlmq::Error::Json { .. }
    ));
    std::fs::remove_dir_all(&tmp).unwrap();
}
