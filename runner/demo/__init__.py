"""The embedded demo model's data, training, evaluation and shipping (not needed to generate).

    data      procedural captioned clips (one coloured shape, a motion, a background)
    train     the training recipe                     python -m runner.demo.train
    ship      install a finished run as assets/demo   python -m runner.demo.ship RUN
    evaluate  held-out captions, caption response     python -m runner.demo.evaluate
    judge     what a video shows: colour, motion, shape; PSNR and SSIM
"""
