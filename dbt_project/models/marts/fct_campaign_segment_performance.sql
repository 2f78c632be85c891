-- One row per campaign x contact attribute x value: how each part of the audience that was
-- sent to responded (country, RFM group, gender, age band, region). The holdout is left
-- out (it was sent nothing); a missing value is 'unknown'. Rates are over delivered
-- messages, with Wilson 95% intervals.

with

messages as (

    select * from {{ ref('fct_messages') }}
    where not is_holdout

),

contacts as (

    select * from {{ ref('dim_contacts') }}

),

recipients as (

    select
        messages.campaign_id,
        messages.sent_at is not null as is_sent,
        messages.status = 'delivered' as is_delivered,
        messages.clicked,
        messages.converted,
        messages.revenue,
        messages.cost,
        contacts.country,
        contacts.rfm_segment,
        contacts.gender,
        case
            when contacts.age is null then null
            when contacts.age < 25 then '18-24'
            when contacts.age < 35 then '25-34'
            when contacts.age < 45 then '35-44'
            when contacts.age < 55 then '45-54'
            when contacts.age < 65 then '55-64'
            else '65+'
        end as age_band,
        contacts.region
    from messages
    left join contacts
        on messages.contact_id = contacts.contact_id

),

by_attribute as (

    {% set attributes = ['country', 'rfm_segment', 'gender', 'age_band', 'region'] %}
    {% for attribute in attributes %}
    select
        campaign_id,
        '{{ attribute }}' as attribute,
        coalesce(cast({{ attribute }} as {{ dbt.type_string() }}), 'unknown') as value,
        is_sent,
        is_delivered,
        clicked,
        converted,
        revenue,
        cost
    from recipients
    {% if not loop.last %}union all{% endif %}
    {% endfor %}

),

totals as (

    select
        campaign_id,
        attribute,
        value,
        cast(sum(case when is_sent then 1 else 0 end) as bigint) as sent,
        cast(sum(case when is_delivered then 1 else 0 end) as bigint) as delivered,
        cast(sum(case when clicked then 1 else 0 end) as bigint) as clicks,
        cast(sum(case when converted then 1 else 0 end) as bigint) as conversions,
        sum(revenue) as revenue,
        sum(cost) as cost
    from by_attribute
    group by 1, 2, 3

),

final as (

    select
        campaign_id,
        attribute,
        value,
        sent,
        delivered,
        clicks,
        conversions,
        revenue,
        cost,
        case when delivered > 0 then cast(clicks as double precision) / delivered end as click_through_rate,
        {{ wilson_low('clicks', 'delivered') }} as click_through_rate_low,
        {{ wilson_high('clicks', 'delivered') }} as click_through_rate_high,
        case when delivered > 0 then cast(conversions as double precision) / delivered end as conversion_rate,
        {{ wilson_low('conversions', 'delivered') }} as conversion_rate_low,
        {{ wilson_high('conversions', 'delivered') }} as conversion_rate_high
    from totals

)

select * from final
