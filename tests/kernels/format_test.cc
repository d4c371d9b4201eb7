// format.h: presets, names, validation of explicit configs, the stored layout's arithmetic.
#include <gtest/gtest.h>

#include <string>

#include "kvq/format.h"

namespace kvq {
namespace {

TEST(Format, PresetsParseAndValidate) {
  for (Preset p : {Preset::kFp16, Preset::kKivi2, Preset::kKivi4, Preset::kInnerQ, Preset::kInnerQ2,
                   Preset::kInnerQBase}) {
    Preset q;
    ASSERT_TRUE(ParsePreset(PresetName(p), &q));
    EXPECT_EQ(q, p);
    for (int d : {64, 128, 256}) EXPECT_EQ(ValidateConfig(PresetConfig(p), d), "") << PresetName(p) << " d " << d;
  }
  Preset q;
  EXPECT_FALSE(ParsePreset("kivi3", &q));
  EXPECT_FALSE(ParsePreset("", &q));
  const QuantConfig k2 = PresetConfig(Preset::kKivi2);
  EXPECT_EQ(k2.k.grouping, Grouping::kAlongTokens);
  EXPECT_EQ(k2.k.flush, 128);
  EXPECT_EQ(k2.v.keep, 128);
  const QuantConfig iq = PresetConfig(Preset::kInnerQ);
  EXPECT_EQ(iq.sink, 32);
  EXPECT_TRUE(iq.key_norm);
  EXPECT_EQ(iq.v.mode, QuantMode::kHybrid);
}

std::string Bad(void (*edit)(QuantConfig*), int d = 128) {
  QuantConfig c = PresetConfig(Preset::kInnerQ);
  edit(&c);
  return ValidateConfig(c, d);
}

TEST(Format, BadExplicitConfigsAreErrorsNamingTheField) {
  EXPECT_NE(Bad([](QuantConfig* c) { c->v.flush = 48; }).find("flush"), std::string::npos);
  EXPECT_NE(Bad([](QuantConfig* c) { c->k.bits = 5; }).find("bits"), std::string::npos);
  EXPECT_NE(Bad([](QuantConfig* c) { c->k.group_size = 48; }).find("group_size"), std::string::npos);
  EXPECT_NE(Bad([](QuantConfig* c) { c->k.group_size = 128; }, 64).find("head_dim"), std::string::npos);
  EXPECT_NE(Bad([](QuantConfig* c) { c->sink = 129; }).find("sink"), std::string::npos);
  EXPECT_NE(Bad([](QuantConfig* c) { c->k.keep = -1; }).find("keep"), std::string::npos);
  EXPECT_NE(Bad([](QuantConfig* c) { c->k.flush = 0; }).find("flush"), std::string::npos);
  EXPECT_NE(Bad([](QuantConfig* c) { c->k = TensorFormat{}; }).find("key_norm"), std::string::npos);
  EXPECT_NE(Bad([](QuantConfig* c) { c->k.mode = QuantMode(9); }).find("mode"), std::string::npos);
  EXPECT_NE(Bad([](QuantConfig* c) { c->v.bits = 8; c->v.mode = QuantMode::kFull; }).find("bits"),
            std::string::npos);
  EXPECT_NE(ValidateConfig(PresetConfig(Preset::kKivi2), 96).find("head_dim"), std::string::npos);
  CacheShape sh;
  sh.num_kv_heads = 0;
  sh.head_dim = 64;
  EXPECT_NE(ValidateShape(sh).find("num_kv_heads"), std::string::npos);
}

TEST(Format, LayoutRegionsAreAlignedAndSized) {
  for (int bits : {2, 3, 4, 8})
    for (int g : {32, 64, 128})
      for (int d : {64, 128, 256})
        for (Grouping gr : {Grouping::kAlongTokens, Grouping::kAlongChannels})
          for (QuantMode m : {QuantMode::kAsym, QuantMode::kSym, QuantMode::kHybrid}) {
            if (gr == Grouping::kAlongChannels && d % g) continue;
            TensorFormat f{m, bits, gr, g, 0, g};
            const StreamLayout l = MakeStreamLayout(f, 3, d);
            EXPECT_EQ(l.groups_per_head, kPageTokens * d / g);
            EXPECT_EQ(l.words_per_group, g * bits / 32);
            EXPECT_EQ(l.scales_offset % 16, 0);
            EXPECT_EQ(l.zeros_offset % 16, 0);
            EXPECT_EQ(l.head_bytes % 16, 0);
            EXPECT_GE(l.scales_offset, int64_t{l.groups_per_head} * l.words_per_group * 4);
            EXPECT_GE(l.zeros_offset, l.scales_offset + 2 * l.groups_per_head);
            EXPECT_EQ(l.head_bytes, f.has_zeros() ? l.zeros_offset + AlignUp16(2 * l.groups_per_head) : l.zeros_offset);
            EXPECT_EQ(l.quant_page_bytes, 3 * l.head_bytes);
            EXPECT_EQ(l.fp_page_bytes, int64_t{kPageTokens} * 3 * d * 2);
          }
}

}  // namespace
}  // namespace kvq
