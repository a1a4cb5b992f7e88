"""pltkit.quant"""
